//! The shipped executable as a process: what only a real process shows.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// (soft, hard) "Max open files" of a process, from /proc.
fn open_files_limits(pid: u32) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
}

/// A gateway proxy started by `sh` after `ulimit_args`, its log in `log`; returns once it
/// listens, with the process and its open-files limits then.
fn gateway_under(ulimit_args: &str, log: &std::path::Path) -> (Child, (String, String)) {
    let config = tempfile::tempdir().unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listen.local_addr().unwrap();
    drop(listen);
    let script = format!(
        "ulimit {ulimit_args} && exec \"$0\" proxy --mode gateway --config-dir {} --listen {addr} \
         --upstream http://127.0.0.1:9 --audit-log -",
        config.path().display()
    );
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_claudekey")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Listening means the process is past its start (the limit is raised before that).
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the proxy never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let limits = open_files_limits(child.id()).expect("the proxy's /proc/PID/limits");
    (child, limits)
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Started with containerd 2's soft limit of 1,024 (here 256) under a higher hard one, the proxy
/// raises its soft limit to the hard one: a gateway's connections would otherwise fail to open
/// at a few hundred requests in flight.
#[test]
fn the_proxy_raises_its_open_files_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let (child, (soft, hard)) = gateway_under("-Sn 256", &dir.path().join("log"));
    stop(child);
    assert_ne!(hard, "256", "the test needs a hard limit above 256");
    assert_eq!(soft, hard, "soft open-files limit left at {soft}");
}

/// Where even the hard limit cannot hold the listener's connections, the proxy says so at
/// start, with what to change.
#[test]
fn a_hard_limit_too_low_for_the_connections_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (child, (soft, _)) = gateway_under("-n 1024", &log);
    stop(child);
    assert_eq!(soft, "1024");
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        log.contains("open-files limit is below") && log.contains("nofile"),
        "{log}"
    );
}
