"""The official Anthropic Python SDK against claudekey's proxy (in front of the fake upstream).

Run by tests/proxy_sdk.rs, which starts both and sets ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY,
CLAUDEKEY_LIMITED_API_KEY (a ClaudeKey allowed one request a minute) and CLAUDEKEY_EXPECTED_REPLY.
"""

import os

import anthropic
import pytest

MODEL = "claude-sonnet-4-5-20250929"
REPLY = os.environ["CLAUDEKEY_EXPECTED_REPLY"]
MESSAGES = [{"role": "user", "content": "Say hello."}]


def client(**kwargs):
    # Reads ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY from the environment, as workloads do.
    return anthropic.Anthropic(max_retries=0, **kwargs)


def test_sdk_sends_its_key_the_way_the_proxy_expects():
    c = client()
    assert c.base_url.host == "127.0.0.1"
    assert c.api_key == os.environ["ANTHROPIC_API_KEY"]


def test_messages_create():
    message = client().messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert message.content[0].text == REPLY
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0
    assert message.stop_reason == "end_turn"


def test_messages_stream():
    with client().messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY
    assert final.content[0].text == REPLY
    assert final.usage.output_tokens > 1  # from the cumulative message_delta usage


def test_count_tokens():
    count = client().messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert count.input_tokens > 0


def test_models_list():
    ids = [m.id for m in client().models.list()]
    assert MODEL in ids


def test_proxy_429_is_a_rate_limit_error():
    limited = client(api_key=os.environ["CLAUDEKEY_LIMITED_API_KEY"])
    limited.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    with pytest.raises(anthropic.RateLimitError) as caught:
        limited.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_scope_refusal_is_a_permission_error():
    with pytest.raises(anthropic.PermissionDeniedError):
        client().messages.create(model="claude-opus-4-1-20250805", max_tokens=16, messages=MESSAGES)


def test_unknown_key_is_an_authentication_error():
    with pytest.raises(anthropic.AuthenticationError):
        client(api_key="ck_live_not_a_key").messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)


def test_direct_to_fake_upstream_records_the_sdk_credential_header():
    # Straight to the fake (not through the proxy), so the Rust side can see which header this
    # SDK version puts the key in: 2.x sends "Authorization: Bearer", 0.x "x-api-key".
    direct = client(base_url=os.environ["CLAUDEKEY_FAKE_URL"], api_key=os.environ["CLAUDEKEY_FAKE_KEY"])
    direct.messages.count_tokens(model=MODEL, messages=MESSAGES)
