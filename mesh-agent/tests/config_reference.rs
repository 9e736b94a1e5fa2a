//! `config/reference.toml` documents every key with its default: it must load as it is, and
//! with its commented-out tables (`#= ` lines) switched on, so no documented key is one the
//! agent would refuse.

use std::path::Path;

use mesh_agent::config::Config;

fn reference() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/reference.toml");
    std::fs::read_to_string(path).expect("config/reference.toml")
}

#[test]
fn the_reference_loads_as_shipped() {
    let config = Config::parse(&reference(), "reference.toml").unwrap();
    assert_eq!(config.services.len(), 1);
    assert!(config.gossip.is_none() && config.mtls.is_none());
}

#[test]
fn every_commented_key_of_the_reference_is_a_real_one() {
    let text: String = reference()
        .lines()
        .map(|line| line.strip_prefix("#= ").unwrap_or(line))
        .map(|line| format!("{line}\n"))
        .collect();
    let config =
        Config::parse(&text, "reference.toml (all tables on)").unwrap_or_else(|e| panic!("{e}"));
    assert!(config.gossip.is_some(), "the [gossip] table did not apply");
    assert!(config.mtls.is_some(), "the [mtls] table did not apply");
    assert_eq!(config.policies.rules.len(), 1);
}
