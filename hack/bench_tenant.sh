# shellcheck shell=bash
# The benchmark's one tenant, sourced by hack/bench.sh and hack/hotpath.sh so both measure the same
# thing: its (fake) keys, the full gateway policy and the ~1 KB Messages request.

UPKEY=sk-ant-api03-bench-upstream-key-0123456789abcdefghijklmnop
WKEY=ck-bench-workload-key-0123456789abcdefghijklmnopqrstuv
WSHA=$(printf '%s' "$WKEY" | sha256sum | cut -d' ' -f1)

# bench_policy DIR — writes DIR/proxy.json: auth, scope (model globs, endpoints, max_tokens, input
# cap), all three limits set far above what the benchmark sends (so they are checked and accounted,
# never hit), every built-in detector plus a custom pattern, response redaction and the injection flag.
bench_policy() {
  mkdir -p "$1"
  cat >"$1/proxy.json" <<EOF
{
  "claudeKey": { "namespace": "bench", "name": "bench" },
  "upstream": [ { "key": "$UPKEY", "fingerprint": "up:bench", "validUntil": null } ],
  "workloadKeys": [ { "sha256": "$WSHA", "fingerprint": "ck:bench", "validUntil": null } ],
  "policy": {
    "scope": { "models": ["claude-sonnet-4-*", "claude-haiku-4-*"], "endpoints": ["messages", "countTokens", "models"],
               "maxTokens": 4096, "maxInputChars": 200000 },
    "limits": { "requestsPerMinute": 1000000000, "tokensPerMinute": 1000000000000, "perUserRequestsPerHour": 1000000000 },
    "dataProtection": { "redact": ["email", "ssn", "phone", "creditCard"],
                        "customPatterns": [ { "name": "employee-id", "regex": "EMP-[0-9]{6}" } ],
                        "redactResponses": true, "promptInjection": "flag" },
    "expiresAt": null
  }
}
EOF
}

# bench_body FILE — a prompt-sized Messages request (about 1 KB, no PII: the common case; the
# redaction pass runs, nothing is rewritten), with metadata.user_id so the per-user limit is checked.
bench_body() {
  python3 - >"$1" <<'EOF'
import json, sys
prompt = ("Please summarise the customer's ticket below and suggest a polite reply. The order "
          "arrived two days late and the box was damaged. ") * 8
sys.stdout.write(json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 256,
                             "metadata": {"user_id": "bench-user-1"},
                             "messages": [{"role": "user", "content": prompt}]}))
EOF
}

# bench_nginx DIR PORT UPSTREAM_PORT [PACED_PORT PACED_UPSTREAM_PORT] — writes DIR/nginx.conf: the
# suite's bare reverse proxy (one process, no master, keep-alive to the upstream, the upstream key
# set, no logging) on PORT; with the last two, also the paced SSE upstream, unbuffered, on
# PACED_PORT (the streaming row's reference for what a bare proxy adds). Start it with
# `nginx -e DIR/error.log -p DIR -c DIR/nginx.conf`.
bench_nginx() {
  local dir=$1 paced=""
  mkdir -p "$dir/tmp"
  if [ $# -ge 5 ]; then
    paced="
  upstream fake_paced { server 127.0.0.1:$5; keepalive 16; }
  server {
    listen 127.0.0.1:$4;
    location / {
      proxy_pass http://fake_paced;
      proxy_http_version 1.1;
      proxy_buffering off;
      proxy_set_header Connection \"\";
      proxy_set_header x-api-key $UPKEY;
    }
  }"
  fi
  cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  upstream fake { server 127.0.0.1:$3; keepalive 128; }
  server {
    listen 127.0.0.1:$2;
    location / {
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header x-api-key $UPKEY;
    }
  }$paced
}
EOF
}

# bench_webhook_pki DIR — a throwaway CA and a serving certificate for 127.0.0.1 in DIR (ca.crt,
# tls.crt, tls.key): the webhook's TLS for the admission row and hack/pgo.sh's training.
bench_webhook_pki() {
  mkdir -p "$1"
  (
    cd "$1"
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=claudekey bench CA" \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout tls.key -out tls.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\n' >ext.cnf
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
      -extfile ext.cnf -out tls.crt 2>/dev/null
  )
}
