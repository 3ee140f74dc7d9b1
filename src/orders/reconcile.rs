//! `seckill-gateway reconcile`: compare Redis with the database, per item.

use crate::config::Config;

pub async fn main(_config: Config, _item: Option<String>, _repair: bool) -> std::process::ExitCode {
    eprintln!("reconcile: not implemented yet (issue 3)");
    std::process::ExitCode::from(2)
}
