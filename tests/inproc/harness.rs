//! The in-process harness: a [`Server`] on the memory stores inside the
//! test, clients connected to it through in-memory duplex streams served
//! by the real connection task, and tables of steps that send stanzas and
//! expect stanzas, matched structurally.
//!
//! Devices are named `alice`, `bob/laptop`, …: the account (a fixed phone
//! number per name, password = name) and a resource (`phone` when none is
//! given). In XML written in a table:
//! - `{alice}` is alice's bare JID, `{alice.num}` her number, `{domain}`
//!   and `{groups}` the server's and the group service's domains;
//! - in expected stanzas, `{any}` matches any text and `{$g}` captures
//!   what it matches into the variable `g` (or, once captured, matches
//!   only that); a sent stanza can use `{$g}` again.
//!
//! An expected stanza matches a received one when its name, namespace,
//! the attributes it lists (`xmlns` declarations aside) and its text
//! match, and each of its child elements matches a distinct child of the
//! received one, in any order. Unlisted attributes and children are
//! ignored unless the pattern says otherwise: `_exact=''` allows no other
//! child elements, `_absent='a b'` requires attributes `a` and `b` to be
//! missing.
//!
//! Tests run with paused time (`#[tokio::test(start_paused = true)]`):
//! waiting for a stanza that never comes costs no real time, and
//! [`advance`] moves the clock past timeouts. PLAIN hashing runs on the
//! blocking pool, which keeps a current-thread runtime's clock from
//! advancing meanwhile, and test accounts use few PBKDF2 iterations.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::panic::Location;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chatd::config::Config;
use chatd::protocol::element::{Scope, escape, parse_element};
use chatd::protocol::{Element, Frame, Node as XmlNode, ns};
use chatd::server::Server;
use chatd::storage::{RosterItem, Stores, Subscription};
use tokio::time::Instant;

use crate::common::{Client, Read};

/// How long an expected stanza may take to arrive (virtual time).
pub const EXPECT_WITHIN: Duration = Duration::from_secs(10);
/// How long a device must stay quiet to pass [`silent`] (virtual time).
pub const SILENCE: Duration = Duration::from_secs(5);

const NAMES: [&str; 8] = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"];

/// The phone number (localpart) of a named account.
pub fn num(name: &str) -> String {
    let i = NAMES.iter().position(|n| *n == name).unwrap_or_else(|| panic!("unknown account name {name:?}"));
    format!("155500000{:02}", i + 1)
}

/// The bare JID of a named account.
pub fn bare(name: &str) -> String {
    format!("{}@localhost", num(name))
}

/// A data directory (certificate, SASL secret) removed with the node.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server in the test process, on the memory stores.
pub struct Node {
    pub srv: Arc<Server>,
    /// The client listener state connections are served with.
    pub c2s: Arc<chatd::c2s::C2s>,
    _dir: TempDir,
}

impl Node {
    pub fn new() -> Node {
        Node::with(|_| {})
    }

    /// A node whose configuration `f` adjusts after the test defaults
    /// (plaintext SASL, no listeners, one hashing thread).
    pub fn with(f: impl FnOnce(&mut Config)) -> Node {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chatd-inproc-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = Config { data_dir: dir.clone(), ..Default::default() };
        cfg.listen.c2s = String::new();
        cfg.listen.c2s_tls = String::new();
        cfg.listen.allow_plaintext = true;
        cfg.auth.hash_threads = 1;
        f(&mut cfg);
        let srv = Server::new(cfg, Stores::memory()).expect("server");
        let c2s = chatd::c2s::C2s::new(srv.clone()).expect("client listener state");
        Node { srv, c2s, _dir: TempDir(dir) }
    }

    /// Creates the named account unless it exists.
    pub fn account(&self, name: &str) -> String {
        let local = num(name);
        let users = &self.srv.stores.users;
        if !users.has_user(&local).unwrap() {
            users.put_user(&local, &chatd::accounts::make_record(name, 16, 0)).unwrap();
        }
        local
    }

    /// Messages waiting in the named account's offline queue.
    pub fn queued(&self, name: &str) -> usize {
        self.srv.stores.offline.count(&num(name)).unwrap()
    }

    /// Makes `a` and `b` mutual contacts (subscription both), directly in
    /// the store.
    pub fn befriend(&self, a: &str, b: &str) {
        for (x, y) in [(a, b), (b, a)] {
            let item = RosterItem { jid: bare(y), subscription: Subscription::Both, ..Default::default() };
            self.srv.stores.roster.put_roster_item(&self.account(x), &item).unwrap();
        }
    }

    /// A client connected through an in-memory stream to the real
    /// connection task, its stream not opened yet.
    pub fn connect(&self) -> Client {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        tokio::spawn(chatd::c2s::conn::serve_stream(self.c2s.clone(), server, peer, false));
        Client::over(client)
    }

    /// Logs a device in (PLAIN, bind); no presence is sent.
    pub async fn login(&self, device: &str) -> Client {
        let (account, resource) = split(device);
        let local = self.account(account);
        Client::login_over(self.connect(), &local, account, resource, false).await
    }
}

fn split(device: &str) -> (&str, &str) {
    device.split_once('/').unwrap_or((device, "phone"))
}

/// One logged-in device and what the harness tracks for it.
pub struct Device {
    pub client: Option<Client>,
    /// Answer server pings and `<r/>` requests without surfacing them.
    pub auto: bool,
    /// Stream management is on: received stanzas are counted.
    pub sm: bool,
    /// Stanzas received since stream management was enabled.
    pub h: u32,
    pub resume_id: Option<String>,
    /// Received and not yet consumed by a step.
    pending: VecDeque<Element>,
}

impl Device {
    fn new(c: Client) -> Device {
        Device { client: Some(c), auto: true, sm: false, h: 0, resume_id: None, pending: VecDeque::new() }
    }

    fn note(&mut self, e: &Element) {
        if e.ns == ns::SM && e.local_name() == "enabled" {
            self.sm = true;
            self.h = 0;
            self.resume_id = e.attr("id").map(str::to_string);
        }
        if self.sm && e.ns == ns::CLIENT && matches!(e.local_name(), "message" | "presence" | "iq") {
            self.h = self.h.wrapping_add(1);
        }
    }

    /// Answers `e` if it is a ping or an ack request and answering is
    /// automatic; true when it was answered.
    async fn answer(&mut self, e: &Element) -> bool {
        if !self.auto {
            return false;
        }
        let reply = if e.is("r", ns::SM) {
            format!("<a xmlns='urn:xmpp:sm:3' h='{}'/>", self.h)
        } else if e.is("iq", ns::CLIENT) && e.attr("type") == Some("get") && e.has_child("ping", ns::PING) {
            format!(
                "<iq type='result' id='{}' to='{}'/>",
                escape(e.attr("id").unwrap_or("")),
                e.attr("from").unwrap_or("localhost")
            )
        } else {
            return false;
        };
        // A write to a stream the server closed fails; reading says so next.
        if let Some(c) = self.client.as_mut() {
            let _ = c.try_send(&reply).await;
        }
        true
    }

    /// The next stanza not answered automatically, before `deadline`.
    async fn next(&mut self, deadline: Instant) -> Result<Element, String> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(e);
        }
        loop {
            let Some(c) = self.client.as_mut() else { return Err("the device is disconnected".into()) };
            match c.read_until(deadline).await {
                Read::Frame(Frame::Stanza(e)) => {
                    self.note(&e);
                    if !self.answer(&e).await {
                        return Ok(e);
                    }
                }
                Read::Frame(Frame::Header(_)) => {}
                Read::Frame(Frame::Close) | Read::Closed => return Err("the stream ended".into()),
                Read::Idle => return Err("nothing arrived".into()),
            }
        }
    }

    /// Reads whatever has arrived, without waiting.
    async fn pump(&mut self) {
        loop {
            let Some(c) = self.client.as_mut() else { return };
            match c.read_until(Instant::now()).await {
                Read::Frame(Frame::Stanza(e)) => {
                    self.note(&e);
                    if !self.answer(&e).await {
                        self.pending.push_back(e);
                    }
                }
                Read::Frame(Frame::Header(_)) => {}
                Read::Frame(Frame::Close) | Read::Closed | Read::Idle => return,
            }
        }
    }
}

enum Op {
    Send(String, String),
    Expect(String, Vec<String>),
    Silent(String),
    Closed(String, Option<String>),
    Advance(Duration),
    Drop(String),
    Login(String),
    Resume(String, bool),
    Manual(String),
    Online(String),
    Check(String, Box<dyn Fn(&Node) -> bool>),
}

/// One row of a table, with where it was written.
pub struct Step {
    at: &'static Location<'static>,
    op: Op,
}

#[track_caller]
fn step(op: Op) -> Step {
    Step { at: Location::caller(), op }
}

/// `device` sends `xml`.
#[track_caller]
pub fn send(device: &str, xml: &str) -> Step {
    step(Op::Send(device.into(), xml.into()))
}

/// The next stanza `device` receives matches `pattern`.
#[track_caller]
pub fn expect(device: &str, pattern: &str) -> Step {
    step(Op::Expect(device.into(), vec![pattern.into()]))
}

/// The next `patterns.len()` stanzas `device` receives match the
/// patterns, in any order.
#[track_caller]
pub fn expect_all(device: &str, patterns: &[&str]) -> Step {
    step(Op::Expect(device.into(), patterns.iter().map(|p| p.to_string()).collect()))
}

/// `device` receives nothing (but automatic answers) for [`SILENCE`].
#[track_caller]
pub fn silent(device: &str) -> Step {
    step(Op::Silent(device.into()))
}

/// The server ends `device`'s stream, with the stream error `condition`
/// when given.
#[track_caller]
pub fn closed(device: &str, condition: Option<&str>) -> Step {
    step(Op::Closed(device.into(), condition.map(str::to_string)))
}

/// Lets `secs` of virtual time pass; devices keep answering pings and ack
/// requests, and what else arrives waits for the next expectation.
#[track_caller]
pub fn advance(secs: u64) -> Step {
    step(Op::Advance(Duration::from_secs(secs)))
}

/// `device`'s connection breaks (no closing tag).
#[track_caller]
pub fn drop_link(device: &str) -> Step {
    step(Op::Drop(device.into()))
}

/// `device` logs in on a new connection (a new session).
#[track_caller]
pub fn login(device: &str) -> Step {
    step(Op::Login(device.into()))
}

/// `device` reconnects and resumes its session with the `h` it counted;
/// `ok` says whether the server must accept.
#[track_caller]
pub fn resume(device: &str, ok: bool) -> Step {
    step(Op::Resume(device.into(), ok))
}

/// From now on `device` answers nothing by itself: pings and `<r/>`
/// must be expected like any stanza.
#[track_caller]
pub fn manual(device: &str) -> Step {
    step(Op::Manual(device.into()))
}

/// `device` sends initial presence and receives its echo.
#[track_caller]
pub fn online(device: &str) -> Step {
    step(Op::Online(device.into()))
}

/// `what` holds of the node's state (its stores, its registry) once the
/// server has handled everything sent so far.
#[track_caller]
pub fn check(what: &str, f: impl Fn(&Node) -> bool + 'static) -> Step {
    step(Op::Check(what.into(), Box::new(f)))
}

/// Returns once every task of the runtime has run out of work: with
/// paused time the clock only moves when nothing else can run, so a timer
/// that is due at once fires exactly then. Server state read after this
/// reflects every stanza sent before.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// A node and its devices, driven by tables of steps.
pub struct World {
    pub node: Node,
    devices: BTreeMap<String, Device>,
    pub vars: HashMap<String, String>,
}

impl World {
    /// A fresh node with `devices` logged in.
    pub async fn new(devices: &[&str]) -> World {
        World::on(Node::new(), devices).await
    }

    /// `devices` logged in on `node`.
    pub async fn on(node: Node, devices: &[&str]) -> World {
        let mut w = World { node, devices: BTreeMap::new(), vars: HashMap::new() };
        for d in devices {
            let c = w.node.login(d).await;
            w.devices.insert(d.to_string(), Device::new(c));
        }
        w
    }

    pub fn device(&mut self, name: &str) -> &mut Device {
        self.devices.get_mut(name).unwrap_or_else(|| panic!("no device {name:?}"))
    }

    /// Runs the steps in order; the first that fails panics with its
    /// location, what was expected and what arrived.
    pub async fn run(&mut self, steps: &[Step]) {
        for (i, s) in steps.iter().enumerate() {
            if let Err(why) = self.run_one(&s.op).await {
                panic!("step {} at {}:{}: {why}", i + 1, s.at.file(), s.at.line());
            }
        }
    }

    async fn run_one(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Send(d, xml) => {
                let xml = self.fill(xml, false)?;
                let c = self.device(d).client.as_mut().ok_or_else(|| format!("{d} is disconnected"))?;
                if c.try_send(&xml).await { Ok(()) } else { Err(format!("{d} cannot write: its stream is gone")) }
            }
            Op::Expect(d, patterns) => self.expect(d, patterns).await,
            Op::Silent(d) => {
                let until = Instant::now() + SILENCE;
                let dev = self.device(d);
                match dev.next(until).await {
                    Ok(e) => Err(format!("{d} should receive nothing, got\n    {e}")),
                    Err(_) if Instant::now() >= until => Ok(()),
                    Err(why) => Err(format!("{d} should stay connected and quiet: {why}")),
                }
            }
            Op::Closed(d, condition) => {
                let until = Instant::now() + EXPECT_WITHIN;
                let dev = self.device(d);
                let mut error = None;
                loop {
                    match dev.next(until).await {
                        Ok(e) if e.ns == ns::STREAM && e.local_name() == "error" => {
                            error =
                                e.elements().find(|c| c.ns == ns::STREAM_ERRORS).map(|c| c.local_name().to_string());
                        }
                        Ok(e) => return Err(format!("{d} should see its stream end, got\n    {e}")),
                        Err(_) if Instant::now() >= until => return Err(format!("{d}: the stream stayed open")),
                        Err(_) => {
                            dev.client = None;
                            if condition.is_some() && error != *condition {
                                return Err(format!("{d}: the stream ended with error {error:?}, want {condition:?}"));
                            }
                            return Ok(());
                        }
                    }
                }
            }
            Op::Advance(d) => {
                let end = Instant::now() + *d;
                loop {
                    for dev in self.devices.values_mut() {
                        dev.pump().await;
                    }
                    let now = Instant::now();
                    if now >= end {
                        return Ok(());
                    }
                    tokio::time::sleep((end - now).min(Duration::from_secs(1))).await;
                }
            }
            Op::Drop(d) => {
                self.device(d).client = None;
                Ok(())
            }
            Op::Login(d) => {
                let c = self.node.login(d).await;
                self.devices.insert(d.clone(), Device::new(c));
                Ok(())
            }
            Op::Resume(d, ok) => {
                let (account, _) = split(d);
                let local = self.node.account(account);
                let mut c = self.node.connect();
                c.open().await.ok_or("no stream features")?;
                c.plain(&local, account).await.ok_or("authentication failed")?;
                let dev = self.device(d);
                let id = dev.resume_id.clone().ok_or_else(|| format!("{d} never enabled resumption"))?;
                let answer = c.resume(&id, dev.h).await.ok_or("no answer to <resume/>")?;
                match (answer.local_name(), ok) {
                    ("resumed", true) | ("failed", false) => {}
                    _ => return Err(format!("{d}: resume answered\n    {answer}")),
                }
                if *ok {
                    dev.client = Some(c);
                }
                Ok(())
            }
            Op::Manual(d) => {
                self.device(d).auto = false;
                Ok(())
            }
            Op::Check(what, f) => {
                settle().await;
                if f(&self.node) { Ok(()) } else { Err(format!("expected: {what}")) }
            }
            Op::Online(d) => {
                let (account, resource) = split(d);
                let echo = format!("<presence from='{}/{resource}'/>", bare(account));
                let c = self.device(d).client.as_mut().ok_or_else(|| format!("{d} is disconnected"))?;
                if !c.try_send("<presence/>").await {
                    return Err(format!("{d} cannot write: its stream is gone"));
                }
                self.expect(d, &[echo]).await
            }
        }
    }

    async fn expect(&mut self, d: &str, patterns: &[String]) -> Result<(), String> {
        let mut want = Vec::new();
        for p in patterns {
            let filled = self.fill(p, true)?;
            let el = parse_element(filled.as_bytes(), &Scope::client_stream())
                .map_err(|e| format!("pattern {filled} does not parse: {e}"))?;
            want.push((filled, el));
        }
        let until = Instant::now() + EXPECT_WITHIN;
        while !want.is_empty() {
            let mut vars = self.vars.clone();
            let got = match self.device(d).next(until).await {
                Ok(e) => e,
                Err(why) => {
                    let list: Vec<&str> = want.iter().map(|(f, _)| f.as_str()).collect();
                    return Err(format!("{d} expected\n    {}\nbut {why}", list.join("\n    ")));
                }
            };
            let mut reasons = Vec::new();
            let mut hit = None;
            for (i, (_, p)) in want.iter().enumerate() {
                let mut v = vars.clone();
                match matches(p, &got, &mut v) {
                    Ok(()) => {
                        hit = Some(i);
                        vars = v;
                        break;
                    }
                    Err(r) => reasons.push(r),
                }
            }
            match hit {
                Some(i) => {
                    want.remove(i);
                    self.vars = vars;
                }
                None => {
                    let mut msg = format!("{d} received\n    {got}\n");
                    for ((f, _), r) in want.iter().zip(reasons) {
                        msg.push_str(&format!("which does not match\n    {f}\n  because {r}\n"));
                    }
                    return Err(msg);
                }
            }
        }
        Ok(())
    }

    /// Replaces names and bound variables in `xml`; unbound variables and
    /// `{any}` stay for the matcher when `pattern` is set.
    fn fill(&self, xml: &str, pattern: bool) -> Result<String, String> {
        let mut out = String::with_capacity(xml.len());
        let mut rest = xml;
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let end = rest[i..].find('}').ok_or_else(|| format!("unclosed {{ in {xml}"))? + i;
            let token = &rest[i + 1..end];
            match token {
                "any" if pattern => out.push_str("{any}"),
                "domain" => out.push_str("localhost"),
                "groups" => out.push_str("groups.localhost"),
                t if t.starts_with('$') => match self.vars.get(&t[1..]) {
                    Some(v) => out.push_str(&escape(v)),
                    None if pattern => out.push_str(&rest[i..=end]),
                    None => return Err(format!("variable {t} is not captured yet (in {xml})")),
                },
                t => match t.strip_suffix(".num") {
                    Some(name) if NAMES.contains(&name) => out.push_str(&num(name)),
                    None if NAMES.contains(&t) => out.push_str(&bare(t)),
                    _ => return Err(format!("unknown placeholder {{{t}}} in {xml}")),
                },
            }
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Whether `got` matches the pattern `p`; on success captured variables
/// are added to `vars`, on failure the first difference is described.
pub fn matches(p: &Element, got: &Element, vars: &mut HashMap<String, String>) -> Result<(), String> {
    if p.local_name() != got.local_name() || p.ns != got.ns {
        return Err(format!(
            "<{}/> in {} is not <{}/> in {}",
            got.local_name(),
            got.ns.as_str(),
            p.local_name(),
            p.ns.as_str()
        ));
    }
    let at = || format!("<{}/>", p.local_name());
    for (k, v) in &p.attrs {
        if k == "xmlns" || k.starts_with("xmlns:") || k == "_exact" {
            continue;
        }
        if k == "_absent" {
            for a in v.split_whitespace() {
                if let Some(x) = got.attr(a) {
                    return Err(format!("{}: attribute {a} should be absent, is '{x}'", at()));
                }
            }
            continue;
        }
        match got.attr(k) {
            None => return Err(format!("{}: attribute {k} is missing (want '{v}')", at())),
            Some(x) if !value_matches(v, x, vars) => {
                return Err(format!("{}: attribute {k} is '{x}', want '{v}'", at()));
            }
            Some(_) => {}
        }
    }
    let ptext: String =
        p.children.iter().filter_map(|n| if let XmlNode::Text(t) = n { Some(t.as_str()) } else { None }).collect();
    let ptext = ptext.trim();
    if !ptext.is_empty() {
        let gtext = got.text();
        if !value_matches(ptext, gtext.trim(), vars) {
            return Err(format!("{}: text is '{}', want '{ptext}'", at(), gtext.trim()));
        }
    }
    let pk: Vec<&Element> = p.elements().collect();
    let gk: Vec<&Element> = got.elements().collect();
    if p.attr("_exact").is_some() && pk.len() != gk.len() {
        return Err(format!("{}: {} child elements, want exactly {}", at(), gk.len(), pk.len()));
    }
    let mut used = vec![false; gk.len()];
    if assign(&pk, &gk, &mut used, vars) {
        return Ok(());
    }
    // Name the first expected child that matches nothing on its own.
    for c in &pk {
        let mut why = Vec::new();
        let alone = gk.iter().any(|g| match matches(c, g, &mut vars.clone()) {
            Ok(()) => true,
            Err(r) => {
                why.push(r);
                false
            }
        });
        if !alone {
            let detail = if why.is_empty() { "it has no child elements".to_string() } else { why.join("; ") };
            return Err(format!("{}: no child matches {c} ({detail})", at()));
        }
    }
    Err(format!("{}: the children cannot all be matched at once", at()))
}

/// Matches pattern children to distinct received children, backtracking.
fn assign(pk: &[&Element], gk: &[&Element], used: &mut [bool], vars: &mut HashMap<String, String>) -> bool {
    let Some((first, rest)) = pk.split_first() else { return true };
    for i in 0..gk.len() {
        if used[i] {
            continue;
        }
        let mut v = vars.clone();
        if matches(first, gk[i], &mut v).is_ok() {
            used[i] = true;
            if assign(rest, gk, used, &mut v) {
                *vars = v;
                return true;
            }
            used[i] = false;
        }
    }
    false
}

enum Seg<'a> {
    Lit(&'a str),
    Any,
    Var(&'a str),
}

fn segments(p: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    let mut rest = p;
    while let Some(i) = rest.find('{') {
        let Some(len) = rest[i..].find('}') else { break };
        let token = &rest[i + 1..i + len];
        let seg = match token {
            "any" => Seg::Any,
            t if t.starts_with('$') => Seg::Var(&t[1..]),
            _ => {
                out.push(Seg::Lit(&rest[..i + len + 1]));
                rest = &rest[i + len + 1..];
                continue;
            }
        };
        if i > 0 {
            out.push(Seg::Lit(&rest[..i]));
        }
        out.push(seg);
        rest = &rest[i + len + 1..];
    }
    if !rest.is_empty() {
        out.push(Seg::Lit(rest));
    }
    out
}

/// Matches a value against a pattern with `{any}` and `{$var}` holes.
pub fn value_matches(pattern: &str, got: &str, vars: &mut HashMap<String, String>) -> bool {
    glob(&segments(pattern), got, vars)
}

fn glob(segs: &[Seg<'_>], got: &str, vars: &mut HashMap<String, String>) -> bool {
    let Some((first, rest)) = segs.split_first() else { return got.is_empty() };
    match first {
        Seg::Lit(l) => got.strip_prefix(l).is_some_and(|g| glob(rest, g, vars)),
        Seg::Var(name) if vars.contains_key(*name) => {
            let v = vars[*name].clone();
            got.strip_prefix(v.as_str()).is_some_and(|g| glob(rest, g, vars))
        }
        Seg::Any | Seg::Var(_) => {
            let min = usize::from(matches!(first, Seg::Var(_)));
            for i in (min..=got.len()).filter(|i| got.is_char_boundary(*i)) {
                let mut v = vars.clone();
                if let Seg::Var(name) = first {
                    v.insert(name.to_string(), got[..i].to_string());
                }
                if glob(rest, &got[i..], &mut v) {
                    *vars = v;
                    return true;
                }
            }
            false
        }
    }
}
