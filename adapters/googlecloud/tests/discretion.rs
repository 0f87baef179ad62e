//! No credentials in errors, `Debug` output or logs: with application-default credentials
//! whose file holds secrets (a service-account key, a refresh token, or text that is not
//! even JSON), connecting to an endpoint that cannot serve the request fails with errors
//! (and logs, captured at TRACE level) that show none of the secrets.
//!
//! One test in its own binary: it sets `GOOGLE_APPLICATION_CREDENTIALS` for the process.
//! It needs no emulator.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};

const SECRETS: &[&str] = &[
    "SECRETKEYMATERIAL",
    "secret-private-key-id-4711",
    "secret-refresh-token-0815",
    "secret-client-secret-42",
    "NOT-JSON-SECRET-99",
];

fn service_account() -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "tidemill-test",
        "private_key_id": "secret-private-key-id-4711",
        "private_key": "-----BEGIN PRIVATE KEY-----\nSECRETKEYMATERIALSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n",
        "client_email": "robot@tidemill-test.iam.gserviceaccount.com",
        "client_id": "1234",
        "token_uri": "http://127.0.0.1:9/token",
    })
    .to_string()
}

fn authorized_user() -> String {
    serde_json::json!({
        "type": "authorized_user",
        "client_id": "1234.apps.googleusercontent.com",
        "client_secret": "secret-client-secret-42",
        "refresh_token": "secret-refresh-token-0815",
        "token_uri": "http://127.0.0.1:9/token",
    })
    .to_string()
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_discreet(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

#[tokio::test]
async fn credentials_never_appear_in_errors_debug_or_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .try_init();

    // An endpoint that accepts connections and answers every request with garbage.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _serving = tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let _ = c
                    .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });

    let dir = std::env::temp_dir().join(format!("tidemill-discretion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, content) in [
        ("service_account", service_account()),
        ("authorized_user", authorized_user()),
        ("not_json", "{ NOT-JSON-SECRET-99 ".to_owned()),
    ] {
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, content).unwrap();
        // Edition 2021, one test per process: nothing else reads the environment meanwhile.
        std::env::set_var("GOOGLE_APPLICATION_CREDENTIALS", &file);
        std::env::remove_var("PUBSUB_EMULATOR_HOST");
        let config = GoogleCloudConfig {
            endpoint: Some(format!("http://{addr}")),
            connect_timeout: Duration::from_secs(3),
            ..GoogleCloudConfig::new("tidemill-test")
        };
        assert_discreet("Debug of the configuration", &format!("{config:?}"));
        match GoogleCloudPublisher::connect(config.clone()).await {
            Ok(p) => {
                assert_discreet(name, &format!("{p:?}"));
                let err = tidemill_core::Publisher::publish_one(
                    &p,
                    "t-discreet",
                    tidemill_core::Message::new("x"),
                )
                .await
                .expect_err("nothing can be published there");
                assert_discreet(name, &format!("{err} / {err:?}"));
            }
            Err(err) => {
                eprintln!("{name}: publisher: {err}");
                assert_discreet(name, &format!("{err} / {err:?}"));
            }
        }
        match GoogleCloudSubscriber::connect(config).await {
            Ok(s) => assert_discreet(name, &format!("{s:?}")),
            Err(err) => {
                eprintln!("{name}: subscriber: {err}");
                assert_discreet(name, &format!("{err} / {err:?}"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert_discreet("the logs", &logs);
}
