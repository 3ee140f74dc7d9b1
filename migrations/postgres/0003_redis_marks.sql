-- Per Redis shard, the highest write mark (epoch, seq) whose events this database holds
-- (src/engine/seq.rs): a Redis whose shard is below its mark has lost writes. Written by
-- the persistence worker in the transaction of the events it carries.
CREATE TABLE IF NOT EXISTS redis_marks (
    shard BIGINT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    seq   BIGINT NOT NULL
);
