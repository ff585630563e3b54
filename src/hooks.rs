//! The module registry: how features plug into the session.
//!
//! A feature is one file under `modules/` that exports a [`Module`]: its
//! name, the specifications it implements, and a `register` function that
//! hooks handlers into [`Hooks`]. `modules::ALL` lists the modules; adding
//! a XEP is one new file plus one line there. Nothing else names a module
//! to dispatch to it.
//!
//! Hooks, in the order a client stanza meets them:
//! - **stanza stages** ([`Stage`]): every message, presence and iq from the
//!   client, after `from` is stamped and `to` parsed, runs through the
//!   handlers of its stage in descending priority; a handler consumes the
//!   stanza (returns `None`) or hands it on. Prosody's `module:hook` with
//!   priorities, and "return true to stop", is the model.
//! - **iq handlers**, by target, type, payload namespace and element name,
//!   called by the iq stage's default handler (`modules::iq`);
//! - **nonzas**: top-level elements that are not stanzas, by namespace
//!   (XEP-0352 `<active/>`, …);
//! - **outgoing**: every stanza the router pushes to a session, before it
//!   is written (XEP-0352 holds some back);
//! - **lifecycle**: a session ended; an account's data is being erased
//!   (each module erases what it stored, so nothing of the account
//!   survives for whoever holds the number next).
//!
//! And what the server advertises: stream features by negotiation phase,
//! disco features and extensions of the server's disco#info.
//!
//! Handlers are plain `fn` pointers: hooks are registered once at start
//! and never change, so dispatch is a scan of a short slice with no
//! locking and no allocation.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::{Element, Jid};
use crate::session::Session;

/// A feature module: what it implements and how it hooks in.
pub struct Module {
    /// Short name, for logs and the code map.
    pub name: &'static str,
    /// Specifications it implements, e.g. `"XEP-0199"`.
    pub specs: &'static [&'static str],
    /// Registers the module's handlers.
    pub register: fn(&mut Hooks),
}

/// Where in the handling of a client stanza a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// An incoming `<message/>`, before routing.
    Message,
    /// An incoming `<presence/>`, before routing.
    Presence,
    /// An incoming `<iq/>`, before dispatch by payload.
    Iq,
}

/// A stanza stage handler: consumes the stanza (`None`) or hands it on,
/// possibly changed.
pub type StanzaHook = fn(&mut Session, Element, Option<Jid>) -> Option<(Element, Option<Jid>)>;

/// Priorities for stage hooks: higher runs first.
pub mod priority {
    /// Checks every stanza of the stage must pass (type, rate limits).
    pub const ADMIT: i32 = 200;
    /// Hooks that claim whole address spaces (the groups service).
    pub const INTERCEPT: i32 = 100;
    /// The default handler of a stage.
    pub const DEFAULT: i32 = 0;
}

/// Whom an iq request is addressed to, as the dispatcher sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IqTarget {
    /// The server (no `to`, or the domain).
    Server,
    /// The sender's own bare JID (answered by the server for the account).
    Own,
    /// Another local account's bare JID (answered by the server on its
    /// behalf).
    Account,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IqType {
    Get,
    Set,
}

impl IqType {
    pub fn parse(t: &str) -> Option<IqType> {
        match t {
            "get" => Some(IqType::Get),
            "set" => Some(IqType::Set),
            _ => None,
        }
    }
}

/// Both request types, for handlers that answer a wrong type themselves.
pub const GET_SET: &[IqType] = &[IqType::Get, IqType::Set];

/// An iq request handed to its handler.
pub struct IqRequest<'a> {
    pub iq: &'a Element,
    /// The iq's first child element.
    pub payload: &'a Element,
    pub to: Option<&'a Jid>,
}

pub type IqHandler = fn(&mut Session, &IqRequest<'_>);

/// A nonza handler (top-level element in the namespace it registered).
pub type NonzaHandler = fn(&mut Session, &Element);

/// An outgoing hook: returns the stanza to write now, or `None` if it
/// took it (to write later).
pub type OutgoingHook = fn(&mut Session, Arc<str>) -> Option<Arc<str>>;

/// Called when a session ends for good.
pub type SessionHook = fn(&mut Session);

/// Erases what a module stored for an account (deleted, or its number
/// handed to a new owner). Runs with or without a live server.
pub type AccountErased =
    fn(&crate::storage::Stores, Option<&crate::server::Server>, &str) -> crate::storage::Result<crate::storage::Ticket>;

/// When a stream feature is offered (RFC 6120 §4.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeaturePhase {
    /// With the SASL mechanisms, before authentication.
    BeforeAuth,
    /// With resource binding, after authentication.
    AfterAuth,
}

/// A stream feature a module offers, or `None` when it is off.
pub type StreamFeature = fn(&crate::server::Server) -> Option<Element>;

/// Adds to the server's disco#info answer (e.g. a XEP-0128 form).
pub type DiscoExtension = fn(&Session, &mut Element);

struct IqEntry {
    target: IqTarget,
    typ: IqType,
    ns: &'static str,
    name: &'static str,
    handler: IqHandler,
}

/// Every handler of every module; built once at start.
#[derive(Default)]
pub struct Hooks {
    stages: Vec<(Stage, i32, StanzaHook)>,
    iqs: Vec<IqEntry>,
    nonzas: Vec<(&'static str, NonzaHandler)>,
    outgoing: Vec<OutgoingHook>,
    ended: Vec<SessionHook>,
    erased: Vec<AccountErased>,
    disco_features: Vec<&'static str>,
    account_disco_features: Vec<&'static str>,
    disco_extensions: Vec<DiscoExtension>,
    features: Vec<(FeaturePhase, StreamFeature)>,
}

impl Hooks {
    /// The hooks of `modules`, in list order.
    pub fn build(modules: &[&Module]) -> Hooks {
        let mut h = Hooks::default();
        for m in modules {
            tracing::debug!(module = m.name, specs = ?m.specs, "module loaded");
            (m.register)(&mut h);
        }
        // Stable: equal priorities keep registration order.
        h.stages.sort_by_key(|(_, p, _)| -p);
        h
    }

    /// Hooks `f` into `stage` at `priority`.
    pub fn stanza(&mut self, stage: Stage, priority: i32, f: StanzaHook) {
        self.stages.push((stage, priority, f));
    }

    /// Handles iq requests of the given types to `target` whose payload is
    /// `<name xmlns=ns>`.
    pub fn iq(&mut self, target: IqTarget, types: &[IqType], ns: &'static str, name: &'static str, f: IqHandler) {
        for typ in types {
            self.iqs.push(IqEntry { target, typ: *typ, ns, name, handler: f });
        }
    }

    /// Handles iq requests to the server and to the sender's own account.
    pub fn iq_server(&mut self, types: &[IqType], ns: &'static str, name: &'static str, f: IqHandler) {
        self.iq(IqTarget::Server, types, ns, name, f);
        self.iq(IqTarget::Own, types, ns, name, f);
    }

    pub fn nonza(&mut self, ns: &'static str, f: NonzaHandler) {
        self.nonzas.push((ns, f));
    }

    pub fn outgoing(&mut self, f: OutgoingHook) {
        self.outgoing.push(f);
    }

    pub fn session_ended(&mut self, f: SessionHook) {
        self.ended.push(f);
    }

    pub fn account_erased(&mut self, f: AccountErased) {
        self.erased.push(f);
    }

    /// A stream feature offered in `phase`.
    pub fn stream_feature(&mut self, phase: FeaturePhase, f: StreamFeature) {
        self.features.push((phase, f));
    }

    /// The stream features modules offer in `phase`, in registration order.
    pub fn stream_features(&self, phase: FeaturePhase, srv: &crate::server::Server) -> Vec<Element> {
        self.features.iter().filter(|(p, _)| *p == phase).filter_map(|(_, f)| f(srv)).collect()
    }

    /// A feature the server advertises in disco#info.
    pub fn disco_feature(&mut self, var: &'static str) {
        self.disco_features.push(var);
    }

    /// A feature advertised in the disco#info of every account.
    pub fn account_disco_feature(&mut self, var: &'static str) {
        self.account_disco_features.push(var);
    }

    pub fn disco_extension(&mut self, f: DiscoExtension) {
        self.disco_extensions.push(f);
    }

    /// Runs the stage's hooks until one consumes the stanza.
    pub fn run_stage(&self, stage: Stage, s: &mut Session, el: Element, to: Option<Jid>) {
        let mut cur = (el, to);
        for (st, _, f) in &self.stages {
            if *st != stage {
                continue;
            }
            match f(s, cur.0, cur.1) {
                Some(next) => cur = next,
                None => return,
            }
        }
    }

    /// The handler for an iq request, if any module registered one.
    pub fn iq_handler(&self, target: IqTarget, typ: IqType, ns: &str, name: &str) -> Option<IqHandler> {
        self.iqs.iter().find(|e| e.target == target && e.typ == typ && e.ns == ns && e.name == name).map(|e| e.handler)
    }

    pub fn nonza_handler(&self, ns: &str) -> Option<NonzaHandler> {
        self.nonzas.iter().find(|(n, _)| *n == ns).map(|(_, f)| *f)
    }

    /// Runs the outgoing hooks; `None` when one took the stanza.
    pub fn run_outgoing(&self, s: &mut Session, mut xml: Arc<str>) -> Option<Arc<str>> {
        for f in &self.outgoing {
            xml = f(s, xml)?;
        }
        Some(xml)
    }

    pub fn run_session_ended(&self, s: &mut Session) {
        for f in &self.ended {
            f(s);
        }
    }

    pub fn account_erased_hooks(&self) -> &[AccountErased] {
        &self.erased
    }

    pub fn disco_features(&self) -> &[&'static str] {
        &self.disco_features
    }

    pub fn account_disco_features(&self) -> &[&'static str] {
        &self.account_disco_features
    }

    pub fn disco_extensions(&self) -> &[DiscoExtension] {
        &self.disco_extensions
    }
}

/// Per-session state of modules, by type: a module keeps what it needs
/// about one session here instead of in a field of [`Session`].
#[derive(Default)]
pub struct Extensions(HashMap<TypeId, Box<dyn Any + Send>>);

impl Extensions {
    /// The module state of type `T`, created on first use.
    pub fn get<T: Default + Send + 'static>(&mut self) -> &mut T {
        let b = self.0.entry(TypeId::of::<T>()).or_insert_with(|| Box::new(T::default()));
        match b.downcast_mut::<T>() {
            Some(t) => t,
            None => unreachable!("entries are keyed by their own TypeId"),
        }
    }

    /// The module state of type `T`, if the module created it.
    pub fn peek<T: 'static>(&self) -> Option<&T> {
        self.0.get(&TypeId::of::<T>()).and_then(|b| b.downcast_ref::<T>())
    }
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Extensions({} entries)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counter(u32);

    #[test]
    fn extensions_are_per_type_and_created_on_first_use() {
        let mut e = Extensions::default();
        assert!(e.peek::<Counter>().is_none());
        e.get::<Counter>().0 += 2;
        e.get::<Counter>().0 += 1;
        *e.get::<String>() = "x".into();
        assert_eq!(e.peek::<Counter>().map(|c| c.0), Some(3));
        assert_eq!(e.peek::<String>().map(String::as_str), Some("x"));
    }

    #[test]
    fn iq_handlers_match_target_type_and_payload() {
        fn a(_: &mut Session, _: &IqRequest<'_>) {}
        let mut h = Hooks::default();
        h.iq_server(&[IqType::Get], "urn:x", "q", a);
        assert!(h.iq_handler(IqTarget::Server, IqType::Get, "urn:x", "q").is_some());
        assert!(h.iq_handler(IqTarget::Own, IqType::Get, "urn:x", "q").is_some());
        assert!(h.iq_handler(IqTarget::Account, IqType::Get, "urn:x", "q").is_none());
        assert!(h.iq_handler(IqTarget::Server, IqType::Set, "urn:x", "q").is_none());
        assert!(h.iq_handler(IqTarget::Server, IqType::Get, "urn:y", "q").is_none());
        assert!(h.iq_handler(IqTarget::Server, IqType::Get, "urn:x", "other").is_none());
    }
}
