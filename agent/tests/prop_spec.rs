//! Property tests of the spec parser and validator, where a fuzzer cannot run (no nightly):
//! arbitrary text and bytes, and spec files written from the real grammar with hostile
//! values. Whatever the input, `parse_toml` answers without panicking, and either
//!
//! - accepts a spec that validates back to itself from its canonical form and survives the
//!   wire (domain -> proto -> domain), or
//! - refuses it with errors that each name a field of the spec and say why.
//!
//! Cases per property: `PROPTEST_CASES`, else the default below (the suite stays well under
//! a minute in a debug build on two cores).

mod common;

use common::Hostility;
use corral_agent::api::convert::{HostDefaults, spec_from_proto, spec_to_proto};
use corral_agent::spec::{self, ServiceSpec};
use proptest::prelude::*;

/// Checks one input, as the properties state.
fn check(text: &str) -> Result<(), TestCaseError> {
    let read = spec::read_toml(text);
    match spec::parse_toml(text) {
        Ok(spec) => {
            // What was accepted was read without a problem and validates to the same spec.
            let raw = read.map_err(|e| TestCaseError::fail(format!("read_toml: {e}")))?;
            let again = raw.validate();
            prop_assert_eq!(again.as_ref(), Ok(&spec));
            check_accepted(&spec)
        }
        Err(e) => {
            // A spec that was read cleanly is refused by validation, never by parse_toml alone.
            if let Ok(raw) = read {
                prop_assert!(raw.validate().is_err(), "parse_toml refused {text:?}: {e}");
            }
            common::check_refusal(&e)
        }
    }
}

/// An accepted spec is canonical: its raw form validates back to it, it survives the wire,
/// and the canonical form of what came back is the same text.
fn check_accepted(spec: &ServiceSpec) -> Result<(), TestCaseError> {
    let again = spec.to_raw().validate();
    prop_assert_eq!(again.as_ref(), Ok(spec));
    // On the wire every default the host decides is filled in; read back, what only spells
    // out a default is made absent again.
    let host = HostDefaults::of_this_process();
    let spec = &host.normalize(spec.clone());
    let wire = spec_to_proto(spec, &host);
    let back = spec_from_proto(wire.clone())
        .and_then(|raw| raw.validate())
        .map(|s| host.normalize(s))
        .map_err(|e| TestCaseError::fail(format!("{e}\n{wire:?}")))?;
    prop_assert_eq!(&back, spec);
    prop_assert_eq!(back.to_raw(), spec.to_raw());
    prop_assert_eq!(spec_to_proto(&back, &host), wire);
    Ok(())
}

proptest! {
    #![proptest_config(common::config(1000))]

    #[test]
    fn any_text_is_answered(text in any::<String>()) {
        check(&text)?;
    }

    #[test]
    fn any_bytes_are_answered(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn hostile_spec_files_are_answered(text in common::spec_file(Hostility::HIGH)) {
        check(&text)?;
    }

    #[test]
    fn nearly_valid_spec_files_are_answered(text in common::spec_file(Hostility::LOW)) {
        check(&text)?;
    }

    /// A valid spec with one hostile line added anywhere in its grammar (its last value
    /// replaced, a key duplicated, a section or value appended) is still answered.
    #[test]
    fn a_valid_spec_with_a_hostile_line(
        at in 0usize..12,
        line in (proptest::sample::select(common::TOP_KEYS), common::toml_value())
            .prop_map(|(k, v)| format!("{k} = {v}")),
    ) {
        let lines: Vec<&str> = VALID.lines().collect();
        let at = at.min(lines.len());
        let mut edited: Vec<&str> = lines[..at].to_vec();
        edited.push(&line);
        edited.extend(&lines[at..]);
        check(&edited.join("\n"))?;
    }
}

const VALID: &str = r#"name = "web"
command = ["/bin/true"]
replicas = 2
[resources]
cpu = 0.5
memory = "256MiB"
[ports]
admin = "auto"
[health]
http = "http://127.0.0.1:{port.admin}/healthz"
[stop]
grace = "5s"
"#;

#[test]
fn the_generators_reach_every_answer() {
    // The properties above mean little if the files were never accepted: the grammar must
    // produce valid specs as well as syntax errors and refusals.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut count = |h: Hostility| {
        let files = common::spec_file(h);
        let (mut accepted, mut syntax, mut refused) = (0, 0, 0);
        for _ in 0..300 {
            let text = files.new_tree(&mut runner).expect("a value").current();
            match spec::parse_toml(&text) {
                Ok(_) => accepted += 1,
                Err(e) if e.has_field(spec::SYNTAX_FIELD) => syntax += 1,
                Err(_) => refused += 1,
            }
        }
        (accepted, syntax, refused)
    };
    let low = count(Hostility::LOW);
    let high = count(Hostility::HIGH);
    eprintln!("(accepted, syntax errors, refused) of 300: nearly valid {low:?}, hostile {high:?}");
    assert!(
        low.0 >= 60,
        "nearly valid files (accepted, syntax, refused): {low:?}"
    );
    assert!(
        high.1 >= 10 && high.2 >= 100,
        "hostile files (accepted, syntax, refused): {high:?}"
    );
    assert!(spec::parse_toml(VALID).is_ok());
}
