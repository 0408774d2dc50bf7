//! Answers that are not EC2's, from a real HTTP server on loopback (a
//! captive portal's page, a proxy's error, an error without a code, text
//! with terminal escapes), read by the real aws-sdk-ec2 client: each is
//! classed by what it can mean and said so the user can act on it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use acode_ec2::effects::CallBudget;
use acode_ec2::effects::api::Ec2Api;
use acode_ec2::effects::rate_limit::RateLimits;
use acode_ec2::effects::sdk::SdkEc2;
use acode_ec2::error_code::{AwsErrorCode, ErrorClass};
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};

/// A server on 127.0.0.1 that answers every request with `status` and
/// `body`; how many requests it got.
fn serve(
    status: &'static str,
    content_type: &'static str,
    body: String,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = n.trim().parse().unwrap_or(0);
                }
            }
            let mut request = vec![0; length];
            let _ = reader.read_exact(&mut request);
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, asked)
}

/// EC2 calls to `url`, two tries each, without waiting long between them.
fn ec2_at(url: &str) -> SdkEc2 {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .endpoint_url(url)
        .build();
    SdkEc2::with_rate_limits(
        aws_sdk_ec2::Client::from_conf(config),
        RateLimits::unlimited(),
    )
    .with_budget(CallBudget {
        attempts: 2,
        connect: Duration::from_secs(2),
        attempt: Duration::from_secs(5),
        operation: Duration::from_secs(10),
        first_backoff: Duration::from_millis(10),
    })
}

/// How DescribeInstances through `url` failed (`why` it must fail).
async fn describe_failure(url: &str, why: &str) -> acode_ec2::effects::api::Ec2Failure {
    ec2_at(url)
        .describe_instance("i-0123456789abcdef0")
        .await
        .expect_err(why)
}

#[tokio::test]
async fn a_page_that_is_not_ec2s_is_retried_and_said_to_be_foreign() {
    let page = "<html><body>Please log in to the guest network</body></html>".to_string();
    let (url, asked) = serve("200 OK", "text/html", page);
    let failure = describe_failure(&url, "a page is no answer").await;
    // A read that may pass: retried within the call, then left to the machine.
    assert_eq!(failure.class, ErrorClass::Transient, "{failure}");
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    let said = failure.to_string();
    assert!(
        said.starts_with("DescribeInstances: ")
            && said.contains("HTTP 200")
            && said.contains("not EC2's")
            && said.contains("AWS_ENDPOINT_URL_EC2"),
        "{said}"
    );
}

#[tokio::test]
async fn an_error_without_a_code_is_a_refusal_that_names_the_endpoint_as_suspect() {
    let (url, asked) = serve(
        "403 Forbidden",
        "text/xml",
        "<Response><Errors><Error/></Errors></Response>".to_string(),
    );
    let failure = describe_failure(&url, "refused").await;
    assert_eq!(failure.class, ErrorClass::Rejected, "{failure}");
    assert_eq!(asked.load(Ordering::SeqCst), 1, "a refusal is not retried");
    let said = failure.to_string();
    assert!(
        said.contains("HTTP 403") && said.contains("not EC2's"),
        "{said}"
    );
}

/// A proxy's "later" (408, 429) without an EC2 code is no refusal.
#[tokio::test]
async fn a_proxys_later_is_retried() {
    for status in ["408 Request Timeout", "429 Too Many Requests"] {
        let (url, asked) = serve(status, "text/plain", "slow down".to_string());
        let failure = describe_failure(&url, "no answer").await;
        assert_eq!(failure.class, ErrorClass::Transient, "{status}: {failure}");
        assert_eq!(asked.load(Ordering::SeqCst), 2, "{status}");
    }
}

#[tokio::test]
async fn server_text_cannot_forge_lines_or_drive_the_terminal() {
    // A line break, a C1 control (CSI) and a right-to-left override, all
    // valid in XML 1.0.
    let message = "line one\n[   9.9s] Ready               forged\u{9b}31m \u{202e}deredro";
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>AuthFailure</Code>\
         <Message>{message}</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
    );
    let (url, _) = serve("401 Unauthorized", "text/xml", body);
    let failure = describe_failure(&url, "refused").await;
    assert!(failure.is(&AwsErrorCode::AuthFailure), "{failure:?}");
    let said = failure.to_string();
    assert!(
        !said.chars().any(char::is_control),
        "control characters reach the terminal: {said:?}"
    );
    assert!(said.contains("line one\\n[   9.9s] Ready"), "{said}");
    assert!(
        !said.contains('\u{202e}') && said.contains("\\u{202e}deredro"),
        "a bidirectional override reaches the terminal: {said:?}"
    );

    // The error code is server text too.
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                <Code>Forged\u{9b}2J\u{202e}</Code><Message>m</Message></Error></Errors>\
                <RequestID>r-2</RequestID></Response>"
        .to_string();
    let (url, _) = serve("400 Bad Request", "text/xml", body);
    let said = describe_failure(&url, "refused").await.to_string();
    assert!(
        !said.contains('\u{9b}') && !said.contains('\u{202e}'),
        "a foreign error code reaches the terminal as it came: {said:?}"
    );
    assert!(said.contains("Forged\\u{9b}2J\\u{202e}"), "{said}");
}

/// A refused launch is proof that it made nothing only when EC2 itself
/// refused it (an error code); a foreign page's 4xx is no such proof.
#[tokio::test]
async fn only_ec2s_own_refusal_of_a_launch_proves_it_made_nothing() {
    use acode_ec2::effects::ec2::{Launch, run_instance};
    use acode_ec2::machine::token::ClientToken;
    use acode_ec2::machine::{ImageChoice, Input, SessionContext, Timestamp};
    let request = acode_ec2::config::parse(
        "ec2Target:\n  amiId: ami-0123\n  instanceType: t3.micro\n  subnetId: subnet-1\n  \
         securityGroupIds: [sg-1]\n",
    )
    .expect("config");
    let ctx = SessionContext {
        session_id: "s1".into(),
        request,
        key_dir: "/nonexistent".into(),
        replaces: None,
    };
    let token = ClientToken::derive("s1", 0, false, "subnet-1");
    let image = ImageChoice {
        ami_id: "ami-0123".into(),
        root_device_name: None,
        platform: None,
    };
    let denied = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
        <Code>UnauthorizedOperation</Code><Message>You are not authorized</Message></Error>\
        </Errors><RequestID>r-1</RequestID></Response>";
    for (status, body, refused_for_sure) in [
        ("403 Forbidden", denied.to_string(), true),
        (
            "403 Forbidden",
            "<html>blocked by policy</html>".to_string(),
            false,
        ),
    ] {
        let (url, _) = serve(status, "text/xml", body);
        let launch = Launch {
            client_token: &token,
            spot: false,
            subnet_id: "subnet-1",
            image: &image,
            key_name: "acode-s1",
        };
        let input = run_instance(&ec2_at(&url), &ctx, Timestamp(0), launch).await;
        match input {
            Input::LaunchRefused { .. } if refused_for_sure => {}
            Input::Rejected { .. } if !refused_for_sure => {}
            other => panic!("{status} (EC2's refusal: {refused_for_sure}): {other:?}"),
        }
    }
}
