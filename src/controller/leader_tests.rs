//! Leader election on a virtual clock (tokio's paused time) against an in-memory Lease with the
//! apiserver's optimistic concurrency: a leader whose requests stall or fail must stop leading
//! before any other replica starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// One Lease with resourceVersion checks, as the apiserver keeps it.
#[derive(Default)]
struct Memory {
    lease: Mutex<Option<Lease>>,
    version: Mutex<u64>,
}

/// One replica's connection to [`Memory`]; `stall` makes every call hang, `fail` makes every
/// call fail (a partitioned replica either way).
#[derive(Clone)]
struct Link {
    memory: Arc<Memory>,
    stall: Arc<AtomicBool>,
    fail: Arc<AtomicBool>,
}

impl Link {
    fn new(memory: &Arc<Memory>) -> Self {
        Self {
            memory: memory.clone(),
            stall: Arc::default(),
            fail: Arc::default(),
        }
    }

    async fn gate(&self) -> Result<(), kube::Error> {
        // Every request takes a little time, as a real one does.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if self.stall.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(status(503));
        }
        Ok(())
    }

    fn store(&self, mut lease: Lease, expect: Option<&str>) -> Result<Lease, kube::Error> {
        let mut current = lock(&self.memory.lease);
        let current_version = current
            .as_ref()
            .and_then(|l| l.metadata.resource_version.clone());
        if current_version.as_deref() != expect {
            return Err(status(409));
        }
        let mut version = lock(&self.memory.version);
        *version += 1;
        lease.metadata.resource_version = Some(version.to_string());
        *current = Some(lease.clone());
        Ok(lease)
    }
}

fn status(code: u16) -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure("test", "Test")
            .with_code(code)
            .boxed(),
    )
}

impl LeaseStore for Link {
    async fn get(&self) -> Result<Option<Lease>, kube::Error> {
        self.gate().await?;
        Ok(lock(&self.memory.lease).clone())
    }

    async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        self.gate().await?;
        self.store(lease.clone(), None)
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        self.gate().await?;
        let expect = lease.metadata.resource_version.clone();
        if expect.is_none() {
            return Err(status(409));
        }
        self.store(lease.clone(), expect.as_deref())
    }
}

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: "claudekey-controller".into(),
        namespace: "ops".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
    }
}

/// A replica's leadership as an interval on the virtual clock: from acquiring (published in
/// `started` at once) to stepping down.
async fn lead(
    elector: Arc<Elector<Link>>,
    started: Arc<Mutex<Option<Instant>>>,
) -> (Instant, Instant) {
    elector.acquire().await.expect("acquire");
    let from = Instant::now();
    *lock(&started) = Some(from);
    let _lost = elector.hold().await;
    (from, Instant::now())
}

/// A leader partitioned from the apiserver (its requests `stall` or `fail`) while a standby
/// keeps trying: the standby starts leading only after the old leader stopped, with the margin
/// of lease duration minus renew deadline.
async fn no_overlap(partition: fn(&Link)) {
    let memory = Arc::new(Memory::default());
    let (link_a, link_b) = (Link::new(&memory), Link::new(&memory));
    let a = Arc::new(Elector::with_store(link_a.clone(), config("a")));
    let b = Arc::new(Elector::with_store(link_b, config("b")));
    let leader = tokio::spawn(lead(a, Arc::default()));
    // The standby starts once a holds the Lease.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b_started = Arc::new(Mutex::new(None));
    let standby = tokio::spawn(lead(b, b_started.clone()));
    // a renews for a while (b must stay out), then is cut off at an arbitrary instant.
    tokio::time::sleep(Duration::from_secs(47)).await;
    assert!(!standby.is_finished());
    partition(&link_a);
    let (a_from, a_until) = leader.await.expect("leader task");
    // b leads by now or soon; read when it started without waiting for it to lose.
    let b_from = loop {
        if let Some(at) = *lock(&b_started) {
            break at;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    standby.abort();
    assert!(
        a_until > a_from + Duration::from_secs(40),
        "a led until cut off"
    );
    assert!(
        b_from >= a_until + Duration::from_secs(4),
        "b started at {:?}, a stopped at {:?} (from the test's start): overlap or no margin \
         (want a gap of at least lease duration - renew deadline)",
        b_from - a_from,
        a_until - a_from
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_leader_stops_before_a_standby_starts() {
    no_overlap(|l| l.stall.store(true, Ordering::SeqCst)).await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_leader_stops_before_a_standby_starts() {
    no_overlap(|l| l.fail.store(true, Ordering::SeqCst)).await;
}

/// The Lease's renewTime is another node's wall clock: a follower that trusted it would take a
/// Lease the holder renewed a moment ago when that node's clock runs behind. It must wait a
/// whole lease duration of its own clock from first seeing the record, however old it looks.
#[tokio::test(start_paused = true)]
async fn a_follower_ignores_the_renew_time_of_a_skewed_clock() {
    let memory = Arc::new(Memory::default());
    let link = Link::new(&memory);
    let ancient = micro("2001-01-01T00:00:00Z".parse().expect("time"));
    link.store(
        Lease {
            metadata: ObjectMeta {
                name: Some("claudekey-controller".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("skewed".into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(ancient),
                ..Default::default()
            }),
        },
        None,
    )
    .expect("seed");
    let b = Arc::new(Elector::with_store(link, config("b")));
    let started = Instant::now();
    b.acquire().await.expect("acquire");
    assert!(
        Instant::now() >= started + Duration::from_secs(15),
        "took a Lease by its renewTime after {:?}",
        Instant::now() - started
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_sees_another_holder_steps_down_at_once() {
    let memory = Arc::new(Memory::default());
    let link = Link::new(&memory);
    let a = Elector::with_store(link.clone(), config("a"));
    a.acquire().await.expect("acquire");
    let mut lease = lock(&memory.lease).clone().expect("lease");
    lease.spec.as_mut().expect("spec").holder_identity = Some("intruder".into());
    let version = lease.metadata.resource_version.clone();
    link.store(lease, version.as_deref()).expect("overwrite");
    let started = Instant::now();
    assert!(matches!(a.hold().await, LeaderError::Lost { .. }));
    assert!(Instant::now() - started <= a.config.retry_period() + Duration::from_secs(1));
}

#[test]
fn deadlines_keep_the_client_go_proportions() {
    let c = config("a");
    assert_eq!(c.renew_deadline(), Duration::from_secs(10));
    assert_eq!(c.retry_period(), Duration::from_millis(2500));
    let held = LeaseSpec {
        holder_identity: Some("other".into()),
        lease_duration_seconds: Some(15),
        ..Default::default()
    };
    let seen = Instant::now();
    assert!(!may_take(&held, &c, seen, seen + Duration::from_secs(14)));
    assert!(may_take(&held, &c, seen, seen + Duration::from_secs(15)));
    assert!(may_take(&LeaseSpec::default(), &c, seen, seen));
    let ours = LeaseSpec {
        holder_identity: Some("a".into()),
        ..held
    };
    assert!(may_take(&ours, &c, seen, seen));
}
