//! How a proxy or the controller reaches Redis: the URL and password flags, kept secret
//! everywhere they could be shown, and one self-reconnecting, bounded connection.

use std::{path::Path, str::FromStr, time::Duration};

use anyhow::Context as _;
use redis::{ConnectionInfo, IntoConnectionInfo, aio::ConnectionManager, io::tcp::TcpSettings};
use secrecy::{ExposeSecret, SecretString};

/// `--redis-url`: kept secret (it may carry the password), so neither `Debug` of the flags nor
/// a parse error ever shows it.
#[derive(Clone)]
pub struct RedisUrl(pub SecretString);

impl FromStr for RedisUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(SecretString::from(s.to_string())))
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisUrl([REDACTED])")
    }
}

/// Where the shared counters live. `Debug` never shows the URL or the password.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS); may carry the password.
    pub url: SecretString,
    /// A user from `--redis-username`, used instead of the URL's (a namespace's sidecars log
    /// in as their namespace's user; without one, Redis's `default` user).
    pub username: Option<String>,
    /// A password from `--redis-password-file`, used instead of the URL's.
    pub password: Option<SecretString>,
    pub timeout: Duration,
}

impl RedisSettings {
    /// The settings of `--redis-url`, `--redis-username` and `--redis-password-file` (read
    /// once, here); `None` without a URL.
    pub fn from_flags(
        url: Option<&RedisUrl>,
        username: Option<&str>,
        password_file: Option<&Path>,
        timeout: Duration,
    ) -> anyhow::Result<Option<Self>> {
        let Some(url) = url else {
            if password_file.is_some() || username.is_some() {
                anyhow::bail!(
                    "--redis-password-file and --redis-username need --redis-url (CLAUDEKEY_REDIS_URL)"
                );
            }
            return Ok(None);
        };
        let password = match password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("failed to read --redis-password-file {}", path.display())
                })?;
                Some(SecretString::from(text.trim().to_string()))
            }
            None => None,
        };
        Ok(Some(Self {
            url: url.0.clone(),
            username: username.map(str::to_owned),
            password,
            timeout,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Never quotes the URL: it may hold the password.
    #[error(
        "failed to parse the Redis URL: expected redis://[:password@]host[:port][/db] or rediss://…"
    )]
    Url,
    #[error("failed to configure the Redis client: {0}")]
    Client(String),
}

/// A multiplexed connection that reconnects by itself, every call bounded by the settings'
/// timeout. It connects lazily: whoever holds it starts while Redis is still coming up.
pub fn connect(settings: &RedisSettings) -> Result<ConnectionManager, SharedError> {
    let client = redis::Client::open(connection_info(settings)?)
        .map_err(|e| SharedError::Client(e.category().to_string()))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.timeout))
        .set_response_timeout(Some(settings.timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| SharedError::Client(e.category().to_string()))
}

/// Where and as whom to connect: the URL with the flags' user and password.
fn connection_info(settings: &RedisSettings) -> Result<ConnectionInfo, SharedError> {
    let info = settings
        .url
        .expose_secret()
        .into_connection_info()
        .map_err(|_| SharedError::Url)?;
    let mut redis = info.redis_settings().clone();
    if let Some(username) = &settings.username {
        redis = redis.set_username(username);
    }
    if let Some(password) = &settings.password {
        redis = redis.set_password(password.expose_secret().trim());
    }
    // Without TCP_NODELAY (redis-rs leaves it off) a command written while another is still
    // unanswered, e.g. an admission behind a settlement or many admissions at once, may wait
    // in the kernel for the earlier one's ACK: Nagle's algorithm on a request/reply protocol.
    Ok(info
        .set_redis_settings(redis)
        .set_tcp_settings(TcpSettings::default().set_nodelay(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_url_never_shows_the_password() {
        let settings = RedisSettings {
            url: SecretString::from("redis://:hunter2-secret@[::1"),
            username: None,
            password: None,
            timeout: Duration::from_millis(100),
        };
        let error = connect(&settings).err().unwrap();
        assert!(!error.to_string().contains("hunter2"));
        assert!(!format!("{settings:?}").contains("hunter2"));
        let url: RedisUrl = "redis://:hunter2-secret@host".parse().unwrap();
        assert!(!format!("{url:?}").contains("hunter2"));
    }

    #[test]
    fn commands_go_out_at_once_and_as_the_flags_user() {
        let settings = RedisSettings {
            url: SecretString::from("rediss://:from-url@redis.example:6380/2"),
            username: Some("claudekey-ns-team-a".into()),
            password: Some(SecretString::from("from-file\n")),
            timeout: Duration::from_millis(100),
        };
        let info = connection_info(&settings).unwrap();
        assert!(info.tcp_settings().nodelay());
        assert_eq!(
            info.redis_settings().username(),
            Some("claudekey-ns-team-a")
        );
        assert_eq!(info.redis_settings().password(), Some("from-file"));
        assert_eq!(info.redis_settings().db(), 2);
    }

    #[test]
    fn a_password_file_or_user_needs_a_url() {
        let err = RedisSettings::from_flags(None, None, Some(Path::new("/nope")), Duration::ZERO)
            .unwrap_err();
        assert!(err.to_string().contains("need --redis-url"), "{err}");
        assert!(
            RedisSettings::from_flags(None, None, None, Duration::ZERO)
                .unwrap()
                .is_none()
        );
    }
}
