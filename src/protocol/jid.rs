//! JIDs (`local@domain/resource`), RFC 7622, reduced to what a
//! phone-number service needs: localparts are ASCII digits after
//! normalisation, domains are case-folded, resources are opaque UTF-8.

use std::fmt;

/// Longest part accepted (RFC 7622 §3.1).
const MAX_PART: usize = 1023;

/// A parsed JID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jid {
    pub local: Option<String>,
    pub domain: String,
    pub resource: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed JID")]
pub struct JidError;

impl Jid {
    /// Parses and normalises a JID.
    ///
    /// # Errors
    /// [`JidError`] for empty or over-long parts, or forbidden characters.
    pub fn parse(s: &str) -> Result<Jid, JidError> {
        let (rest, resource) = match s.split_once('/') {
            Some((a, r)) => (a, Some(r)),
            None => (s, None),
        };
        let (local, domain) = match rest.split_once('@') {
            Some((l, d)) => (Some(l), d),
            None => (None, rest),
        };
        let ok = |p: &str| !p.is_empty() && p.len() <= MAX_PART && !p.chars().any(|c| c.is_control());
        if !ok(domain) || domain.contains('@') || domain.chars().any(|c| c.is_whitespace()) {
            return Err(JidError);
        }
        if let Some(l) = local
            && (!ok(l)
                || l.chars().any(|c| matches!(c, '"' | '&' | '\'' | '/' | ':' | '<' | '>' | '@') || c.is_whitespace()))
        {
            return Err(JidError);
        }
        if let Some(r) = resource
            && !ok(r)
        {
            return Err(JidError);
        }
        // Checked again after normalisation: a domain of dots trims to
        // nothing, and lowercasing can lengthen a part past the limit; a
        // JID must print as a string that parses back to itself.
        let local = local.map(|l| l.to_lowercase());
        let domain = domain.trim_end_matches('.').to_lowercase();
        if !ok(&domain) || local.as_deref().is_some_and(|l| !ok(l)) {
            return Err(JidError);
        }
        Ok(Jid { local, domain, resource: resource.map(str::to_string) })
    }

    pub fn bare(&self) -> Jid {
        Jid { local: self.local.clone(), domain: self.domain.clone(), resource: None }
    }

    pub fn with_resource(&self, r: &str) -> Jid {
        Jid { local: self.local.clone(), domain: self.domain.clone(), resource: Some(r.to_string()) }
    }

    pub fn is_bare(&self) -> bool {
        self.resource.is_none()
    }

    /// `local@domain` without resource, as a string.
    pub fn bare_string(&self) -> String {
        match &self.local {
            Some(l) => format!("{l}@{}", self.domain),
            None => self.domain.clone(),
        }
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.local {
            write!(f, "{l}@")?;
        }
        f.write_str(&self.domain)?;
        if let Some(r) = &self.resource {
            write!(f, "/{r}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Jid {
    type Err = JidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Jid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let j = Jid::parse("15551234567@LocalHost/phone/x").unwrap();
        assert_eq!(j.local.as_deref(), Some("15551234567"));
        assert_eq!(j.domain, "localhost");
        assert_eq!(j.resource.as_deref(), Some("phone/x"));
        assert_eq!(j.to_string(), "15551234567@localhost/phone/x");
        assert_eq!(Jid::parse("localhost").unwrap().bare_string(), "localhost");
    }

    #[test]
    fn rejects_bad() {
        for s in ["", "@x", "a@", "a@b/", "a b@c", "a@b@c", "a<@b", ".", "a@...", "x@../r"] {
            assert!(Jid::parse(s).is_err(), "{s}");
        }
    }
}
