//! Spawning processes into a node: its network namespace and one of its cgroups.
//!
//! [`spawn`] forks a child that, in `pre_exec`, first joins the cgroup (writing `"0"` to a
//! `cgroup.procs` the parent opened) and then `setns`es into the network namespace; only then
//! does it exec, so every socket it or its children create is subject to the cgroup's hooks and
//! lives in the node's namespace. The order matters: the hooks see a socket's cgroup as of its
//! creation.
//!
//! Each child leads its own process group and gets `PR_SET_PDEATHSIG`: teardown kills the
//! group (so a daemon's helpers go too), and a test process that dies without tearing down
//! takes its children with it. The death signal fires when the spawning *thread* exits, so
//! spawn from the thread that owns the bed.
//!
//! A [`Proc`] captures stdout/stderr line by line (or sends both to a log file), waits with
//! timeouts, and is SIGKILLed (with its group) and reaped on drop. Nothing here blocks without a bound, except
//! reaping a child that was just SIGKILLed.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::cgroup::Cgroup;
use crate::netns::NetNs;

/// Signals the tests send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
    Int,
    Hup,
}

impl Signal {
    /// The raw signal number.
    pub fn raw(self) -> i32 {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Int => libc::SIGINT,
            Signal::Hup => libc::SIGHUP,
        }
    }
}

/// Where a child's output goes.
#[derive(Debug, Clone)]
pub enum Capture {
    /// Both streams captured line by line in memory ([`Proc::wait_line`], [`Proc::finish`]).
    Lines,
    /// Both streams appended to this file (for long-lived daemons).
    File(PathBuf),
}

/// Lines read from one stream so far, and whether it reached EOF.
#[derive(Default)]
struct Lines {
    state: Mutex<(Vec<String>, bool)>,
    cond: Condvar,
}

impl Lines {
    fn pump(self: Arc<Self>, stream: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        lock(&self.state).0.push(line);
                        self.cond.notify_all();
                    }
                }
            }
            lock(&self.state).1 = true;
            self.cond.notify_all();
        });
    }

    fn text(&self) -> String {
        lock(&self.state).0.join("\n")
    }

    fn wait_eof(&self, deadline: Instant) -> bool {
        let mut st = lock(&self.state);
        while !st.1 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// Shared handle on a child so a bed can kill it at teardown even if the test still holds it.
pub type ChildHandle = Arc<Mutex<Child>>;

/// A spawned process, SIGKILLed and reaped on drop.
pub struct Proc {
    label: String,
    pid: i32,
    /// The wall clock just before the child was forked.
    spawned_at: SystemTime,
    child: ChildHandle,
    stdout: Option<Arc<Lines>>,
    stderr: Option<Arc<Lines>>,
}

/// What a finished process printed.
#[derive(Debug, Clone)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Fails unless the process exited 0, quoting its output.
    pub fn ok(self, label: &str) -> Result<Self> {
        if !self.status.success() {
            bail!(
                "{label} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// `cmd.spawn()`, again for a moment while the executable is busy (`ETXTBSY`): a test that has
/// just written a script may see another test thread's child, forked before it closed the file
/// and not yet exec'd, still holding it open.
fn spawn_retrying_busy(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Spawns `cmd` after joining `cgroup` (if any) and then entering `netns` (if any).
pub fn spawn(
    label: &str,
    mut cmd: Command,
    netns: Option<&NetNs>,
    cgroup: Option<&Cgroup>,
    capture: Capture,
) -> Result<Proc> {
    // Opened here, in the parent: after fork only async-signal-safe calls are allowed.
    let procs = cgroup.map(Cgroup::open_procs).transpose()?;
    let procs_fd = procs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    let ns_fd = netns.map(NetNs::raw_fd);
    // SAFETY: the closure only calls prctl(2), write(2) and setns(2), all async-signal-safe,
    // on fds that stay open in the parent until spawn returns (procs, and netns borrowed for
    // the call).
    unsafe {
        cmd.pre_exec(move || {
            // If the test process dies without tearing down (Ctrl-C, a CI timeout), take the
            // child with it. Note: this fires when the spawning *thread* exits.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd {
                // Join the cgroup first, so sockets made after exec belong to it.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // Its own process group, so teardown also kills whatever it forked.
    cmd.process_group(0);
    cmd.stdin(Stdio::null());
    match &capture {
        Capture::Lines => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        Capture::File(path) => {
            let f = File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log {}", path.display()))?;
            let f2 = f.try_clone()?;
            cmd.stdout(f).stderr(f2);
        }
    }
    let spawned_at = SystemTime::now();
    let mut child =
        spawn_retrying_busy(&mut cmd).with_context(|| format!("spawning {label}: {cmd:?}"))?;
    drop(procs);
    let (stdout, stderr) = match capture {
        Capture::Lines => {
            let out = Arc::new(Lines::default());
            let err = Arc::new(Lines::default());
            out.clone().pump(child.stdout.take().expect("piped"));
            err.clone().pump(child.stderr.take().expect("piped"));
            (Some(out), Some(err))
        }
        Capture::File(_) => (None, None),
    };
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    Ok(Proc {
        label: label.to_string(),
        pid,
        spawned_at,
        child: Arc::new(Mutex::new(child)),
        stdout,
        stderr,
    })
}

impl Proc {
    /// The label given at spawn, used in error messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The wall clock just before the child was forked (a bench times a start from it).
    pub fn spawned_at(&self) -> SystemTime {
        self.spawned_at
    }

    /// A weak handle for teardown registries.
    pub fn handle(&self) -> Weak<Mutex<Child>> {
        Arc::downgrade(&self.child)
    }

    /// Sends `sig` unless the process has already exited (and been reaped).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let mut child = lock(&self.child);
        // Holding the lock, nobody else can reap it, so the pid cannot be reused under us.
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill(2) on our own unreaped child's pid has no memory-safety preconditions.
        if unsafe { libc::kill(self.pid, sig.raw()) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("kill({}, {sig:?}) for {}", self.pid, self.label));
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        matches!(lock(&self.child).try_wait(), Ok(None))
    }

    /// Waits for the process to exit, up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = lock(&self.child).try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` for a stdout line satisfying `pred` and returns it. Fails early if
    /// stdout closes first (the process died), quoting what it printed.
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let lines = self
            .stdout
            .as_ref()
            .context("wait_line needs Capture::Lines")?;
        let deadline = Instant::now() + timeout;
        let mut st = lock(&lines.state);
        loop {
            if let Some(l) = st.0.iter().find(|l| pred(l)) {
                return Ok(l.clone());
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                let why = if st.1 { "exited" } else { "timed out" };
                let out = st.0.join("\n");
                drop(st);
                bail!(
                    "{} {why} before printing the expected line\n--- stdout ---\n{out}\n--- stderr ---\n{}",
                    self.label,
                    self.stderr_text()
                );
            }
            st = lines
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Everything captured on stdout so far.
    pub fn stdout_text(&self) -> String {
        self.stdout.as_ref().map(|l| l.text()).unwrap_or_default()
    }

    /// Everything captured on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.as_ref().map(|l| l.text()).unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to exit and returns what it printed. On timeout
    /// the process is killed and an error quotes its output so far.
    pub fn finish(&self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        let Some(status) = self.wait_timeout(timeout)? else {
            let _ = self.signal(Signal::Kill);
            bail!(
                "{} did not finish within {timeout:?}; killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.label,
                self.stdout_text(),
                self.stderr_text()
            );
        };
        // The pipes close once the process (and any child holding them) is gone.
        let grace = deadline.max(Instant::now() + Duration::from_millis(500));
        for l in [&self.stdout, &self.stderr].into_iter().flatten() {
            l.wait_eof(grace);
        }
        Ok(Finished {
            status,
            stdout: self.stdout_text(),
            stderr: self.stderr_text(),
        })
    }
}

/// Locks ignoring poison: a panicking test must still be able to tear down.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// SIGKILLs a child's process group and reaps the child; used by [`Proc`]'s drop and by bed
/// teardown.
pub fn kill_and_reap(child: &Mutex<Child>) {
    let mut child = lock(child);
    if let Ok(None) = child.try_wait() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: the child is unreaped, so its pid (= its process group id, see spawn)
            // still names its group; kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill_and_reap(&self.child);
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.label)
            .field("pid", &self.pid)
            .finish()
    }
}
