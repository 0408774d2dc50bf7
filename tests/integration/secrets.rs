//! NFR-005: no private key material in anything the engine writes. Runs
//! the lab flows (temporary ed25519 and RSA pairs, a generated-and-imported
//! pair, teardowns, a failure) with logs at trace level in text and JSON,
//! a metrics recorder and an event subscriber, then searches the logs, the
//! events, the error texts, the metrics and the SQLite files for each
//! private key the sessions held: PEM markers, the key's base64 lines, and
//! its secret bytes (raw, hex, base64).

use std::io::Write;
use std::sync::{Arc, Mutex};

use acode_ec2::effects::Effects;
use acode_ec2::events::NoProgress;
use acode_ec2::machine::{Effect, Input, SessionContext, Timestamp};
use base64::Engine as _;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

use crate::common::Harness;
use crate::lab::Lab;

/// Effects that keep a copy of every private key file a session writes,
/// so the test knows what must not appear anywhere else.
struct KeyGrabber<E> {
    inner: Arc<E>,
    keys: Mutex<Vec<String>>,
}

impl<E: Effects> Effects for KeyGrabber<E> {
    async fn run(&self, ctx: &SessionContext, created: Timestamp, effect: &Effect) -> Input {
        let input = self.inner.run(ctx, created, effect).await;
        if let Input::KeyPairReady { key } = &input
            && let Some(text) = key
                .private_key_path
                .as_deref()
                .and_then(|p| std::fs::read_to_string(p).ok())
        {
            self.keys.lock().unwrap().push(text);
        }
        input
    }

    fn region(&self) -> Option<String> {
        self.inner.region()
    }
}

/// A `MakeWriter` into a shared buffer.
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

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// What must not leak of one private key: markers, base64 lines, secret bytes.
struct Secret {
    texts: Vec<String>,
    bytes: Vec<u8>,
}

fn secret_of(pem: &str) -> Secret {
    let key = russh::keys::decode_secret_key(pem, None).expect("a private key");
    let bytes = match key.key_data() {
        ssh_key::private::KeypairData::Ed25519(pair) => pair.private.to_bytes().to_vec(),
        ssh_key::private::KeypairData::Rsa(pair) => pair.private().d().as_bytes().to_vec(),
        other => panic!("unexpected key type {:?}", other.algorithm()),
    };
    let mut texts: Vec<String> = vec!["PRIVATE KEY".into()];
    texts.extend(
        pem.lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 40)
            .map(str::to_string),
    );
    texts.push(bytes.iter().map(|b| format!("{b:02x}")).collect());
    texts.push(base64::engine::general_purpose::STANDARD.encode(&bytes));
    Secret { texts, bytes }
}

/// Places a secret shows up in a haystack: (what, where).
fn leaks(secret: &Secret, name: &str, haystack: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(haystack);
    let mut found: Vec<String> = secret
        .texts
        .iter()
        .filter(|t| text.contains(t.as_str()))
        .map(|t| format!("{name}: {}…", &t[..t.len().min(24)]))
        .collect();
    if haystack
        .windows(secret.bytes.len().min(16))
        .any(|w| secret.bytes.starts_with(w))
    {
        found.push(format!("{name}: raw secret bytes"));
    }
    found
}

#[test]
fn the_scanner_finds_a_key_where_there_is_one() {
    let (pem, _) =
        acode_ec2::effects::keys::generate(acode_ec2::request::KeyAlgorithm::Ed25519).unwrap();
    let secret = secret_of(pem.as_str());
    let logged = format!("some log line {} and more", pem.as_str());
    // `{:?}` (an assert, a dbg!, a derived Debug around it) prints no key.
    assert!(leaks(&secret, "debug", format!("{pem:?}").as_bytes()).is_empty());
    assert!(!leaks(&secret, "log", logged.as_bytes()).is_empty());
    assert!(leaks(&secret, "log", b"nothing here").is_empty());
    let raw = [b"xx".as_slice(), &secret.bytes[..16], b"yy"].concat();
    assert!(!leaks(&secret, "db", &raw).is_empty());
}

#[tokio::test]
async fn no_private_key_material_in_logs_events_errors_metrics_or_the_database() {
    let lab = Lab::start();
    let harness = Harness::new();
    let (text_logs, json_logs) = (Captured::default(), Captured::default());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::TRACE)
        .with(tracing_subscriber::fmt::layer().with_writer(text_logs.clone()))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_writer(json_logs.clone()),
        );
    let _logs = tracing::subscriber::set_default(subscriber);
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let grabber = Arc::new(KeyGrabber {
        inner: lab.effects(),
        keys: Mutex::new(Vec::new()),
    });
    let engine = harness.engine(grabber.clone());
    let mut events = engine.subscribe();
    let mut errors = Vec::new();
    for block in [
        "  keyPair:\n    mode: temporary\n    keyType: ed25519\n",
        "  keyPair:\n    mode: temporary\n    keyType: rsa\n",
        "  keyPair:\n    mode: import\n    keyType: ed25519\n",
    ] {
        let ready = engine
            .provision(lab.request(block), &NoProgress)
            .await
            .unwrap_or_else(|e| panic!("{block}: {e}"));
        engine
            .teardown(&ready.session_id, &NoProgress)
            .await
            .unwrap();
    }
    // A failure after the key pair was made: a host key the console never printed.
    lab.configure(json!({"console_mode": "wrong-fingerprint"}));
    let failed = engine
        .provision(
            lab.request("  keyPair:\n    mode: temporary\n    keyType: rsa\n"),
            &NoProgress,
        )
        .await
        .unwrap_err();
    errors.push(failed.to_string());
    errors.push(format!("{failed:?}"));

    let mut emitted = Vec::new();
    while let Ok(event) = events.try_recv() {
        emitted.push(serde_json::to_string(&event).unwrap());
    }
    let keys = grabber.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 4, "every flow made its key");
    let db = harness.dir.path().join("state.db");
    let mut database = std::fs::read(&db).unwrap();
    database.extend(std::fs::read(db.with_extension("db-wal")).unwrap_or_default());
    let haystacks: Vec<(&str, Vec<u8>)> = vec![
        ("text logs", text_logs.0.lock().unwrap().clone()),
        ("JSON logs", json_logs.0.lock().unwrap().clone()),
        ("events", emitted.join("\n").into_bytes()),
        ("errors", errors.join("\n").into_bytes()),
        ("metrics", metrics.render().into_bytes()),
        ("database", database),
    ];
    for (name, haystack) in &haystacks {
        assert!(
            haystack.len() > 100,
            "{name} is nearly empty: nothing was scanned"
        );
    }
    let mut found = Vec::new();
    for key in &keys {
        let secret = secret_of(key);
        for (name, haystack) in &haystacks {
            found.extend(leaks(&secret, name, haystack));
        }
    }
    assert!(found.is_empty(), "private key material found: {found:?}");
    eprintln!(
        "secret scan: {} keys, {} bytes of logs, events, errors, metrics and database: 0 hits",
        keys.len(),
        haystacks.iter().map(|(_, h)| h.len()).sum::<usize>()
    );
}
