//! The fake Anthropic API behaves like the real one where tests rely on it: authentication by
//! either header, 401 for unknown and deactivated keys, the SSE event sequence, count_tokens,
//! models, rate-limit headers and the Admin API's key list (paginated), get and update.

mod proxy_common;

use claudekey::fake_upstream::{FakeUpstream, KeyStatus, Reply as FakeReply};
use proxy_common::*;
use serde_json::json;

const KEY: &str = "sk-ant-api03-fakeFAKEfakeFAKEfakeFAKEfakeFAKEfakeFAKEfakeFAKE-f1FF";
const ADMIN: &str = "sk-ant-admin01-adminADMINadminADMINadminADMINadminADMIN-a0AA";

#[tokio::test]
async fn messages_accept_either_header_and_refuse_unknown_keys() {
    let fake = FakeUpstream::start(&[KEY]).await.unwrap();
    let c = client();
    let url = fake.url();
    let r = send(
        &c,
        &url,
        "POST",
        "/v1/messages",
        Some(KEY),
        Some(message("hi", false)),
    )
    .await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["type"], "message");
    assert_eq!(body["content"][0]["type"], "text");
    assert!(body["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(
        r.headers
            .contains_key("anthropic-ratelimit-tokens-remaining")
    );
    assert!(r.headers.contains_key("anthropic-organization-id"));
    assert!(
        r.headers["request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    let r = send(
        &c,
        &url,
        "POST",
        "/v1/messages",
        Some(&format!("Bearer {KEY}")),
        Some(message("hi", false)),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        &c,
        &url,
        "POST",
        "/v1/messages",
        Some("sk-ant-api03-unknown"),
        Some(message("hi", false)),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    fake.set_key_status(KEY, KeyStatus::Inactive);
    let r = send(
        &c,
        &url,
        "POST",
        "/v1/messages",
        Some(KEY),
        Some(message("hi", false)),
    )
    .await;
    assert_eq!(r.status, 401);
    // Recorded as received, credentials included (tests assert on them).
    assert_eq!(fake.received()[0].header("x-api-key"), Some(KEY));
    assert_eq!(
        fake.received()[1].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
}

#[tokio::test]
async fn stream_has_the_real_event_sequence_and_echo_works() {
    let fake = FakeUpstream::start(&[KEY]).await.unwrap();
    fake.set_reply(FakeReply::Echo);
    fake.set_chunk_chars(4);
    let r = create_message(&fake, message("echo this back", true)).await;
    assert_eq!(r.status, 200);
    let events = sse_events(&r.text());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(r.sse_text(), "echo this back");
    assert!(
        events[0].1["message"]["usage"]["input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(events[8].1["usage"]["output_tokens"], 4);
}

#[tokio::test]
async fn replies_stop_at_max_tokens_only_when_asked() {
    let fake = FakeUpstream::start(&[KEY]).await.unwrap();
    fake.set_reply(FakeReply::Text(
        "The lighthouse keeper counted ships.".into(),
    ));
    fake.set_chunk_chars(4);
    let short = |stream| {
        let mut m = message("hi", stream);
        m["max_tokens"] = json!(2);
        m
    };
    // Off (the default): the whole reply whatever max_tokens says.
    let r = create_message(&fake, short(false)).await;
    assert_eq!(r.json()["stop_reason"], "end_turn");
    assert_eq!(
        r.json()["content"][0]["text"],
        "The lighthouse keeper counted ships."
    );

    fake.set_stop_at_max_tokens(true);
    let r = create_message(&fake, short(false)).await;
    let body = r.json();
    assert_eq!(body["content"][0]["text"], "The ligh");
    assert_eq!(body["stop_reason"], "max_tokens");
    assert_eq!(body["usage"]["output_tokens"], 2);
    let r = create_message(&fake, short(true)).await;
    let events = sse_events(&r.text());
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .count();
    assert_eq!((r.sse_text().as_str(), deltas), ("The ligh", 2));
    let end = &events[events.len() - 2].1;
    assert_eq!(end["delta"]["stop_reason"], "max_tokens");
    assert_eq!(end["usage"]["output_tokens"], 2);
    // A reply within max_tokens ends its turn.
    let r = create_message(&fake, message("hi", true)).await;
    assert_eq!(r.sse_text(), "The lighthouse keeper counted ships.");
    let events = sse_events(&r.text());
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "end_turn"
    );
}

#[tokio::test]
async fn validation_count_tokens_and_models() {
    let fake = FakeUpstream::start(&[KEY]).await.unwrap();
    let c = client();
    let url = fake.url();
    let r = send(
        &c,
        &url,
        "POST",
        "/v1/messages",
        Some(KEY),
        Some(json!({ "model": "m", "messages": [] })),
    )
    .await;
    assert_eq!(r.status, 400, "max_tokens is required");
    let r = send(
        &c,
        &url,
        "POST",
        "/v1/messages/count_tokens",
        Some(KEY),
        Some(message("four score and seven", false)),
    )
    .await;
    assert_eq!(r.json()["input_tokens"], 5);
    let r = send(&c, &url, "GET", "/v1/models", Some(KEY), None).await;
    assert!(r.json()["data"].as_array().unwrap().len() >= 2);
    let r = send(
        &c,
        &url,
        "GET",
        "/v1/models/claude-sonnet-4-5-20250929",
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(r.json()["display_name"], "Claude Sonnet 4.5");
}

#[tokio::test]
async fn admin_api_lists_pages_gets_and_updates_keys() {
    let fake = FakeUpstream::start(&[]).await.unwrap();
    fake.add_admin_key(ADMIN);
    let ids: Vec<String> = (0..5).map(|i| fake.add_key(&format!("{KEY}{i}"))).collect();
    let c = client();
    let url = fake.url();
    // Admin calls need the admin key; a normal API key is refused.
    let r = send(
        &c,
        &url,
        "GET",
        "/v1/organizations/api_keys",
        Some(&format!("{KEY}0")),
        None,
    )
    .await;
    assert_eq!(r.status, 401);
    let r = send(
        &c,
        &url,
        "GET",
        "/v1/organizations/api_keys?limit=2",
        Some(ADMIN),
        None,
    )
    .await;
    let page = r.json();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["first_id"], ids[0].as_str());
    let hint = page["data"][0]["partial_key_hint"].as_str().unwrap();
    assert!(
        hint.starts_with("sk-ant-api03-fak...") && hint.ends_with("1FF0"),
        "{hint}"
    );
    let r = send(
        &c,
        &url,
        "GET",
        &format!("/v1/organizations/api_keys?limit=10&after_id={}", ids[1]),
        Some(&format!("Bearer {ADMIN}")),
        None,
    )
    .await;
    let page = r.json();
    assert_eq!(page["data"].as_array().unwrap().len(), 3);
    assert_eq!(page["has_more"], false);
    assert_eq!(page["last_id"], ids[4].as_str());

    let r = send(
        &c,
        &url,
        "POST",
        &format!("/v1/organizations/api_keys/{}", ids[2]),
        Some(ADMIN),
        Some(json!({ "status": "inactive", "name": "retired" })),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "inactive");
    assert_eq!(
        fake.key_status(&format!("{KEY}2")),
        Some(KeyStatus::Inactive)
    );
    let r = send(
        &c,
        &url,
        "GET",
        &format!("/v1/organizations/api_keys/{}", ids[2]),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.json()["name"], "retired");
    let r = send(
        &c,
        &url,
        "POST",
        "/v1/messages",
        Some(&format!("{KEY}2")),
        Some(message("hi", false)),
    )
    .await;
    assert_eq!(r.status, 401, "a deactivated key is refused");
    let r = send(
        &c,
        &url,
        "GET",
        "/v1/organizations/api_keys?status=active",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 4);
    let r = send(
        &c,
        &url,
        "POST",
        "/v1/organizations/api_keys/apikey_nope",
        Some(ADMIN),
        Some(json!({ "status": "active" })),
    )
    .await;
    assert_eq!(r.status, 404);
}

/// The API reads Messages bodies up to 32 MB; the fake must not refuse what it takes.
#[tokio::test]
async fn large_messages_requests_are_read_as_the_api_reads_them() {
    let fake = FakeUpstream::start(&[KEY]).await.unwrap();
    let text = "word ".repeat(4 * 1024 * 1024); // 20 MiB
    let r = create_message(&fake, message(&text, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A paced stream pauses between its text deltas only: the events before the first delta come
/// with the answer, and the block's stop and the message's end right after the last delta.
#[tokio::test]
async fn a_paced_stream_pauses_between_deltas_only() {
    use http_body_util::BodyExt;
    let fake = FakeUpstream::start(&[KEY]).await.unwrap();
    fake.set_reply(FakeReply::Text("abcdefghijkl".into()));
    fake.set_chunk_chars(4);
    let pace = std::time::Duration::from_millis(150);
    fake.set_delta_delay(pace);
    let request = http::Request::post(format!("{}/v1/messages", fake.url()))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            message("hi", true).to_string(),
        )))
        .unwrap();
    let started = std::time::Instant::now();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // (event name, time it arrived)
    let mut arrivals = Vec::new();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        pending.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let name = event.lines().next().unwrap().trim_start_matches("event: ");
            arrivals.push((name.to_string(), started.elapsed()));
        }
    }
    let names: Vec<&str> = arrivals.iter().map(|(n, _)| n.as_str()).collect();
    let first = names
        .iter()
        .position(|n| *n == "content_block_delta")
        .unwrap();
    let last = names
        .iter()
        .rposition(|n| *n == "content_block_delta")
        .unwrap();
    assert_eq!(last - first, 2, "{names:?}");
    let at = |i: usize| arrivals[i].1;
    // Each later delta waits its pace; nothing else does.
    for i in first + 1..=last {
        assert!(at(i) - at(i - 1) >= pace, "{arrivals:?}");
    }
    assert!(at(first) < pace, "{arrivals:?}");
    assert!(at(arrivals.len() - 1) - at(last) < pace / 2, "{arrivals:?}");
}

/// `POST /v1/messages` to `fake` with [`KEY`].
async fn create_message(fake: &FakeUpstream, body: serde_json::Value) -> Reply {
    let url = fake.url();
    send(
        &client(),
        &url,
        "POST",
        "/v1/messages",
        Some(KEY),
        Some(body),
    )
    .await
}
