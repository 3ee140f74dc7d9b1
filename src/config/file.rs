//! `--config FILE`: every setting may also come from a TOML file, under its environment
//! variable's name and nothing else (`SECKILL_RATE_GLOBAL = 500`, `REDIS_URL = "redis://…"`):
//! one spelling, the one `--help` prints and the deployment docs use. A flag or an
//! environment variable wins over the file (the file is the deployment's baseline, an
//! explicit setting is an operator's override), and the file wins over the defaults.
//!
//! A file value goes through the same parser as the flag (durations as `"15m"`, booleans
//! as `true`/`false` or `"true"`, numbers as integers or strings): it is added to the
//! command line as `--flag=value` for every setting that no flag or environment variable
//! gives, and the whole is parsed again by clap. An unknown key, or a value of the wrong
//! kind, is refused with the key's name (lowercase or flag-style names too, with a hint).
//!
//! [`Settings`] keeps each setting's value as text, so a reload can say which ones changed
//! ([`Settings::changed`]).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use super::Cli;

/// The environment name of the config file setting itself (a file cannot name another).
const CONFIG_KEY: &str = "SECKILL_CONFIG";

/// The parsed command line and environment, with the config file under them.
#[derive(Debug)]
pub struct Settings {
    pub cli: Cli,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// Keys of the file that a flag or an environment variable overrides (their file
    /// value is not used).
    pub overridden: Vec<String>,
    /// Every setting's value as text, by environment name (`None`: unset).
    values: BTreeMap<String, Option<String>>,
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Flags or environment: clap's own error (it prints `--help` and `--version` too).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("invalid configuration file {}: {key}: {why}", path.display())]
    File { path: PathBuf, key: String, why: String },
}

impl SettingsError {
    fn file(path: &Path, key: &str, why: impl Into<String>) -> Self {
        SettingsError::File {
            path: path.to_owned(),
            key: key.to_owned(),
            why: why.into(),
        }
    }
}

/// One setting of the command: its clap id, long flag and environment name.
struct Setting {
    id: String,
    long: String,
    env: String,
}

fn settings_of(cmd: &clap::Command) -> Vec<Setting> {
    cmd.get_arguments()
        .filter_map(|a| {
            Some(Setting {
                id: a.get_id().to_string(),
                long: a.get_long()?.to_owned(),
                env: a.get_env()?.to_str()?.to_owned(),
            })
        })
        .collect()
}

impl Settings {
    /// Parse `args` (the program name first) and the environment; with `--config` (or
    /// `SECKILL_CONFIG`), read the file and fill in every setting they leave unset.
    pub fn load<I, T>(args: I) -> Result<Settings, SettingsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let cmd = Cli::command();
        let given = cmd.clone().try_get_matches_from(&args)?;
        let settings = settings_of(&cmd);
        let path = given.get_one::<PathBuf>("config_file").cloned();
        let mut overridden = Vec::new();
        let mut all = args.clone();
        if let Some(path) = &path {
            for (key, text) in read_file(path)? {
                let Some(s) = settings.iter().find(|s| s.env == key) else {
                    return Err(SettingsError::file(path, &key, unknown_key_why(&key, &settings)));
                };
                if key == CONFIG_KEY {
                    return Err(SettingsError::file(path, &key, "a config file cannot name another one"));
                }
                match given.value_source(&s.id) {
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable) => overridden.push(key),
                    _ => {
                        let flag = format!("--{}={text}", s.long);
                        // Parsed alone first, so a bad value is refused with its key's name.
                        let mut one = args.clone();
                        one.push(flag.clone().into());
                        if let Err(e) = cmd.clone().try_get_matches_from(&one) {
                            return Err(SettingsError::file(path, &key, value_why(&e, &text)));
                        }
                        all.push(flag.into());
                    }
                }
            }
        }
        let matches = cmd.try_get_matches_from(&all)?;
        let values = settings
            .iter()
            .filter(|s| s.env != CONFIG_KEY)
            .map(|s| {
                let text = matches
                    .get_raw(&s.id)
                    .map(|vals| vals.map(OsStr::to_string_lossy).collect::<Vec<_>>().join(","));
                (s.env.clone(), text)
            })
            .collect();
        Ok(Settings {
            cli: Cli::from_arg_matches(&matches)?,
            file: path,
            overridden,
            values,
        })
    }

    /// The settings (by environment name) whose values differ in `newer`, in name order.
    pub fn changed(&self, newer: &Settings) -> Vec<String> {
        self.values
            .iter()
            .filter(|(k, v)| newer.values.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// The file's keys and values as text, in file order.
fn read_file(path: &Path) -> Result<Vec<(String, String)>, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|e| SettingsError::file(path, "(file)", e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| SettingsError::file(path, "(syntax)", e.message().to_owned()))?;
    table
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(SettingsError::file(
                        path,
                        &key,
                        "must be a string, a whole number or true/false",
                    ));
                }
            };
            Ok((key, text))
        })
        .collect()
}

/// Why a key is unknown: with the setting it probably means (`rate_global`,
/// `seckill_rate_global` or `rate-global` for `SECKILL_RATE_GLOBAL`).
fn unknown_key_why(key: &str, settings: &[Setting]) -> String {
    let folded = key.to_ascii_lowercase().replace('-', "_");
    let meant = settings
        .iter()
        .find(|s| s.env.eq_ignore_ascii_case(key) || s.id == folded || s.long.replace('-', "_") == folded);
    match meant {
        Some(s) => format!("unknown setting; keys are environment names: {}", s.env),
        None => "unknown setting (keys are the environment names that --help lists)".to_owned(),
    }
}

/// A clap value error in the file's words: the value, and why (no flag names).
fn value_why(e: &clap::Error, text: &str) -> String {
    let mut why = format!("invalid value {text:?}");
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        why.push_str(&format!(" (one of: {})", valid.join(", ")));
    } else if e.kind() == ErrorKind::ValueValidation
        && let Some(cause) = std::error::Error::source(e)
    {
        why.push_str(&format!(": {cause}"));
    }
    why
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn load(args: &[&str]) -> Result<Settings, SettingsError> {
        Settings::load(std::iter::once("seckill-gateway").chain(args.iter().copied()))
    }

    fn refused(args: &[&str]) -> (String, String) {
        match load(args).unwrap_err() {
            SettingsError::File { key, why, .. } => (key, why),
            other => panic!("not a file error: {other}"),
        }
    }

    #[test]
    fn the_file_fills_in_what_flags_leave_unset() {
        let f = file(
            "SECKILL_RATE_GLOBAL = 500\nSECKILL_RATE_PER_USER = \"3\"\nSECKILL_PAYMENT_TIMEOUT = \"2m\"\n\
             SECKILL_TRUST_FORWARDED = true\nSECKILL_LOG_FORMAT = \"json\"\nSECKILL_LOG = \"warn\"\n",
        );
        let path = f.path().to_str().unwrap();
        let s = load(&["--config", path, "--rate-per-user", "7"]).unwrap();
        let c = &s.cli.config;
        assert_eq!(c.rate_global, 500);
        assert_eq!(c.rate_per_user, 7, "the flag wins over the file");
        assert_eq!(s.overridden, ["SECKILL_RATE_PER_USER"]);
        assert_eq!(c.payment_timeout, std::time::Duration::from_secs(120));
        assert!(c.trust_forwarded);
        assert_eq!(c.log_format, super::super::LogFormat::Json);
        assert_eq!(c.log.as_deref(), Some("warn"));
        assert_eq!(c.rate_per_ip, 1000, "a setting in neither keeps its default");
        assert_eq!(s.file.as_deref(), Some(f.path()));
        // After a subcommand too.
        let s = load(&["serve", "--config", path]).unwrap();
        assert_eq!(s.cli.config.rate_per_user, 3);
    }

    #[test]
    fn without_a_file_the_flags_and_defaults() {
        let s = load(&["--rate-global", "9"]).unwrap();
        assert_eq!(s.cli.config.rate_global, 9);
        assert!(s.file.is_none() && s.overridden.is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let f = file("SECKILL_RATE_GLOBAL = 5\nSECKILL_NOPE = 1\n");
        let (key, why) = refused(&["--config", f.path().to_str().unwrap()]);
        assert_eq!(key, "SECKILL_NOPE");
        assert!(why.contains("unknown setting"), "{why}");
        // Lowercase and flag-style names are refused with the name to use.
        for spelling in ["rate_global", "seckill_rate_global", "rate-global"] {
            let f = file(&format!("{spelling} = 5\n"));
            let (key, why) = refused(&["--config", f.path().to_str().unwrap()]);
            assert_eq!(key, spelling);
            assert!(why.contains("SECKILL_RATE_GLOBAL"), "{spelling}: {why}");
        }
        let f = file("SECKILL_RATE_PER_USER = -1\n");
        let (key, why) = refused(&["--config", f.path().to_str().unwrap()]);
        assert_eq!(key, "SECKILL_RATE_PER_USER");
        assert!(why.contains("\"-1\""), "{why}");
        assert!(!why.contains("--rate"), "no flag names in the file's errors: {why}");
        let f = file("SECKILL_LOG_FORMAT = \"xml\"\n");
        let (key, why) = refused(&["--config", f.path().to_str().unwrap()]);
        assert_eq!(key, "SECKILL_LOG_FORMAT");
        assert!(why.contains("text, json"), "{why}");
        let f = file("SECKILL_PAYMENT_TIMEOUT = \"soon\"\n");
        assert_eq!(
            refused(&["--config", f.path().to_str().unwrap()]).0,
            "SECKILL_PAYMENT_TIMEOUT"
        );
        let f = file("SECKILL_RATE_GLOBAL = 1.5\n");
        assert_eq!(
            refused(&["--config", f.path().to_str().unwrap()]).0,
            "SECKILL_RATE_GLOBAL"
        );
        let f = file("SECKILL_CONFIG = \"other.toml\"\n");
        assert_eq!(refused(&["--config", f.path().to_str().unwrap()]).0, "SECKILL_CONFIG");
        let f = file("SECKILL_RATE_GLOBAL = \n");
        assert_eq!(refused(&["--config", f.path().to_str().unwrap()]).0, "(syntax)");
        assert_eq!(refused(&["--config", "/nonexistent/seckill.toml"]).0, "(file)");
    }

    #[test]
    fn changed_names_the_settings_that_differ() {
        let a = file("SECKILL_RATE_PER_USER = 5\nSECKILL_LISTEN = \"127.0.0.1:1\"\n");
        let b = file("SECKILL_RATE_PER_USER = 6\nSECKILL_LISTEN = \"127.0.0.1:2\"\nSECKILL_LOG = \"debug\"\n");
        let old = load(&["--config", a.path().to_str().unwrap()]).unwrap();
        let new = load(&["--config", b.path().to_str().unwrap()]).unwrap();
        assert_eq!(
            old.changed(&new),
            ["SECKILL_LISTEN", "SECKILL_LOG", "SECKILL_RATE_PER_USER"]
        );
        assert!(old.changed(&old).is_empty());
    }
}
