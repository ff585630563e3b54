//! The harness's own matcher: what a pattern accepts and rejects.

use std::collections::HashMap;

use chatd::protocol::Element;
use chatd::protocol::element::{Scope, parse_element};

use crate::harness::{matches, value_matches};

fn el(x: &str) -> Element {
    parse_element(x.as_bytes(), &Scope::client_stream()).unwrap()
}

fn check(pattern: &str, got: &str) -> Result<HashMap<String, String>, String> {
    let mut vars = HashMap::new();
    matches(&el(pattern), &el(got), &mut vars).map(|()| vars)
}

#[test]
fn attributes_children_and_text() {
    let got = "<message from='a@x/r' to='b@x' id='m1' type='chat'><body>hi</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>";
    assert!(check("<message from='a@x/r'/>", got).is_ok(), "unlisted attributes and children are ignored");
    assert!(check("<message from='a@x/r'><body>hi</body></message>", got).is_ok());
    assert!(
        check("<message><active xmlns='http://jabber.org/protocol/chatstates'/><body>hi</body></message>", got).is_ok(),
        "children in any order"
    );
    let e = check("<message from='a@x/other'/>", got).unwrap_err();
    assert!(e.contains("from") && e.contains("a@x/r"), "{e}");
    assert!(check("<message><body>bye</body></message>", got).unwrap_err().contains("no child matches"));
    assert!(check("<message><active/></message>", got).is_err(), "namespaces count");
    assert!(check("<presence/>", got).is_err());
    assert!(check("<message _exact=''><body/></message>", got).unwrap_err().contains("exactly"));
    assert!(check("<message _absent='ask'/>", got).is_ok());
    assert!(check("<message _absent='type'/>", got).unwrap_err().contains("absent"));
    assert!(check("<message><body/><body/></message>", got).is_err(), "each child matches once");
}

#[test]
fn placeholders_and_captures() {
    let got = "<iq type='result' id='c1'><group xmlns='urn:chatd:groups:0' jid='g123@groups.x'/></iq>";
    let vars = check("<iq id='{any}'><group xmlns='urn:chatd:groups:0' jid='{$g}@groups.x'/></iq>", got).unwrap();
    assert_eq!(vars["g"], "g123");
    let mut bound = HashMap::from([("g".to_string(), "g999".to_string())]);
    assert!(!value_matches("{$g}@groups.x", "g123@groups.x", &mut bound), "a bound variable matches only its value");
    assert!(value_matches("{$g}@groups.x", "g999@groups.x", &mut bound));
    let mut v = HashMap::new();
    assert!(value_matches("{$a}/{$b}", "x@y/z/w", &mut v));
    assert_eq!((v["a"].as_str(), v["b"].as_str()), ("x@y", "z/w"));
    assert!(!value_matches("{$a}", "", &mut HashMap::new()), "a capture is never empty");
    assert!(value_matches("{any}", "", &mut HashMap::new()));
}
