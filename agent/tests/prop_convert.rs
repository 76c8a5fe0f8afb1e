//! Property tests of the wire side: `corral.v1.ServiceSpec` messages of every shape through
//! the proto -> domain conversion and validation, and hostile requests through the API
//! service itself (in-process, over the supervisor with fakes for the OS).
//!
//! - A message is either refused with errors that each name a field, or accepted as the
//!   spec it describes, which survives the wire unchanged (domain -> proto -> domain).
//! - `Apply` answers exactly as validation says, with the same message, for typed specs and
//!   spec files alike, and never applies a refused spec.
//! - Every other request with hostile names and numbers gets a clear status and a message
//!   that names the request field it is about.
//!
//! Cases per property: `PROPTEST_CASES`, else the default below.

mod common;

use common::Hostility;
use corral_agent::api::convert::{HostDefaults, spec_from_proto, spec_to_proto};
use corral_agent::api::status::{MAX_MESSAGE, spec_message};
use corral_agent::spec::{ServiceSpec, SpecError};
use corral_proto::v1 as pb;
use corral_proto::v1::agent_server::Agent;
use proptest::prelude::*;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

/// The conversion and validation of a message, as one result.
fn validate(p: &pb::ServiceSpec) -> Result<ServiceSpec, SpecError> {
    spec_from_proto(p.clone()).and_then(|raw| raw.validate())
}

/// Checks one message, as the properties state.
fn check_message(p: &pb::ServiceSpec) -> Result<(), TestCaseError> {
    let spec = match validate(p) {
        Ok(spec) => spec,
        Err(e) => return common::check_refusal(&e),
    };
    // The spec is the one described, not a default standing in for a field.
    prop_assert_eq!(&spec.name, &p.name);
    prop_assert_eq!(&spec.command, &p.command);
    // Under [scale], replicas starts at `min` unless given.
    let default_replicas = spec.scale.map_or(1, |s| s.min);
    prop_assert_eq!(spec.replicas, p.replicas.unwrap_or(default_replicas));
    prop_assert_eq!(spec.scale.is_some(), p.scale.is_some());
    prop_assert_eq!(spec.env.len(), p.env.len());
    for (k, v) in &p.env {
        prop_assert_eq!(spec.env.get(k), Some(v));
    }
    prop_assert_eq!(spec.ports.len(), p.ports.len());
    prop_assert_eq!(spec.sockets.len(), p.sockets.len());
    prop_assert_eq!(spec.user.is_some(), p.user.is_some());
    if let Some(r) = &p.resources {
        prop_assert_eq!(spec.resources.cpu, r.cpu);
        prop_assert_eq!(spec.resources.pids, r.pids);
    }
    prop_assert_eq!(spec.health.is_some(), p.health.is_some());
    // Domain -> proto -> domain gives the same spec, and the canonical message is a fixpoint.
    // Defaults the host decides are filled in on the wire and normalized away when read.
    let host = HostDefaults::of_this_process();
    let spec = host.normalize(spec);
    let wire = spec_to_proto(&spec, &host);
    let back = validate(&wire)
        .map(|s| host.normalize(s))
        .map_err(|e| TestCaseError::fail(format!("{e}\n{wire:?}")))?;
    prop_assert_eq!(&back, &spec);
    prop_assert_eq!(spec_to_proto(&back, &host), wire);
    Ok(())
}

/// `Apply` (a dry run, so that nothing accumulates) answers as validation says.
fn check_apply(
    source: pb::apply_request::Source,
    expected: Result<ServiceSpec, SpecError>,
) -> Result<(), TestCaseError> {
    let api = common::api();
    let request = pb::ApplyRequest {
        source: Some(source),
        dry_run: true,
        force: false,
        ..Default::default()
    };
    let answer = api.rt.block_on(api.service.apply(Request::new(request)));
    match (answer, expected) {
        (Ok(response), Ok(spec)) => {
            let response = response.into_inner();
            prop_assert_eq!(response.outcome(), pb::ApplyOutcome::Created);
            prop_assert_eq!(response.name, spec.name);
        }
        (Err(status), Err(e)) => {
            prop_assert_eq!(status.code(), Code::InvalidArgument);
            // Every error, unless they do not fit in a status (then the first ones).
            prop_assert!(status.message().len() <= MAX_MESSAGE);
            prop_assert_eq!(status.message(), spec_message(&e));
            if e.to_string().len() <= MAX_MESSAGE - 80 {
                prop_assert_eq!(status.message(), e.to_string());
            }
        }
        (Ok(response), Err(e)) => {
            return Err(TestCaseError::fail(format!(
                "accepted {response:?} although it is invalid: {e}"
            )));
        }
        (Err(status), Ok(_)) => {
            return Err(TestCaseError::fail(format!(
                "refused a valid spec: {status:?}"
            )));
        }
    }
    Ok(())
}

/// A refused request says which of its `fields` is wrong (`field: why`), or what was not
/// found.
fn check_status(
    rpc: &str,
    fields: &[&str],
    status: &tonic::Status,
    allowed: &[Code],
) -> Result<(), TestCaseError> {
    prop_assert!(
        allowed.contains(&status.code()),
        "{rpc}: {:?} {:?} (expected one of {allowed:?})",
        status.code(),
        status.message()
    );
    let message = status.message();
    prop_assert!(!message.trim().is_empty(), "{rpc}: empty message");
    match status.code() {
        Code::NotFound => prop_assert!(message.contains("not found"), "{rpc}: {message:?}"),
        _ => {
            let field = message.split_once(": ").map(|(f, _)| f);
            prop_assert!(
                field.is_some_and(|f| fields.contains(&f)),
                "{rpc}: {message:?} does not start with one of the request's fields {fields:?}"
            );
        }
    }
    Ok(())
}

/// Names a client might send: valid ones (of services that do not exist) and hostile ones.
fn names() -> BoxedStrategy<String> {
    common::field(common::NAMES, Hostility::HIGH)
}

proptest! {
    #![proptest_config(common::config(1000))]

    #[test]
    fn hostile_messages_are_answered(p in common::proto_spec(Hostility::HIGH)) {
        check_message(&p)?;
    }

    #[test]
    fn nearly_valid_messages_are_answered(p in common::proto_spec(Hostility::LOW)) {
        check_message(&p)?;
    }

    #[test]
    fn apply_answers_typed_specs_as_validation_does(
        p in prop_oneof![common::proto_spec(Hostility::HIGH), common::proto_spec(Hostility::LOW)]
    ) {
        let expected = validate(&p);
        check_apply(pb::apply_request::Source::Spec(p), expected)?;
    }

    #[test]
    fn apply_answers_spec_files_as_validation_does(
        text in prop_oneof![common::spec_file(Hostility::HIGH), common::spec_file(Hostility::LOW)]
    ) {
        let expected = corral_agent::spec::parse_toml(&text);
        check_apply(pb::apply_request::Source::SpecToml(text), expected)?;
    }

    /// Requests about services, instances and rollouts that do not exist, with hostile names
    /// and extreme numbers: a clear status each, never an answer and never a panic.
    #[test]
    fn hostile_requests_get_clear_statuses(
        name in names(),
        instance in prop_oneof![
            names().prop_map(|n| format!("{n}-0")),
            common::hostile_string(),
        ],
        signal in prop_oneof![
            common::field(common::SIGNALS, Hostility::HIGH),
            any::<i64>().prop_map(|n| n.to_string()),
        ],
        replicas in any::<u32>(),
        last in prop_oneof![Just(0u32), any::<u32>()],
        revision in proptest::option::of(any::<u64>()),
        number in any::<u64>(),
        tail in proptest::option::of(any::<u32>()),
    ) {
        let api = common::api();
        let svc = &api.service;
        let invalid_or_missing = &[Code::InvalidArgument, Code::NotFound];
        api.rt.block_on(async {
            let get = svc.get(Request::new(pb::GetRequest { name: name.clone() })).await;
            check_status("Get", &["name"], &get.expect_err("no services"), invalid_or_missing)?;
            let delete = svc.delete(Request::new(pb::DeleteRequest { name: name.clone(), ..Default::default() })).await;
            check_status("Delete", &["name"], &delete.expect_err("no services"), invalid_or_missing)?;
            let scale = svc
                .scale(Request::new(pb::ScaleRequest { name: name.clone(), replicas, ..Default::default() }))
                .await;
            check_status("Scale", &["name", "replicas"], &scale.expect_err("no services"), invalid_or_missing)?;
            let restart = svc
                .restart(Request::new(pb::RestartRequest { name: name.clone(), force: true, expected_revision: Default::default(), }))
                .await;
            check_status("Restart", &["name"], &restart.expect_err("no services"), invalid_or_missing)?;
            let rollback = svc
                .rollback(Request::new(pb::RollbackRequest {
                    name: name.clone(),
                    revision,
                    force: true,
                    ..Default::default()
                }))
                .await;
            check_status("Rollback", &["name", "revision"], &rollback.expect_err("no services"), invalid_or_missing)?;
            let id = format!("{name}-r{number}");
            let rollout = svc.get_rollout(Request::new(pb::GetRolloutRequest { id })).await;
            check_status("GetRollout", &["id"], &rollout.expect_err("no rollouts"), invalid_or_missing)?;
            let signal = svc
                .signal(Request::new(pb::SignalRequest {
                    instance: instance.clone(),
                    signal: signal.clone(),
                }))
                .await;
            check_status("Signal", &["instance", "signal"], &signal.expect_err("no instances"), invalid_or_missing)?;
            for (service, instance) in [
                (name.clone(), String::new()),
                (String::new(), instance.clone()),
                (name.clone(), instance.clone()),
                (String::new(), String::new()),
            ] {
                let logs = svc
                    .logs(Request::new(pb::LogsRequest {
                        service,
                        instance,
                        follow: true,
                        tail,
                        since: None,
                    }))
                    .await;
                check_status("Logs", &["service", "instance", "service or instance"], &logs.expect_err("no services"), invalid_or_missing)?;
            }
            let watch = svc
                .watch(Request::new(pb::WatchRequest {
                    from_index: number,
                    service: name.clone(),
                    instance: instance.clone(),
                    follow: false,
                    last,
                    ..Default::default()
                }))
                .await;
            match watch {
                // Without follow, the stream ends by itself: nothing happened on this node
                // but the dry runs, which are not events.
                Ok(stream) => {
                    let events: Vec<_> = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        stream.into_inner().collect::<Vec<_>>(),
                    )
                    .await
                    .map_err(|_| TestCaseError::fail("Watch without follow did not end"))?;
                    prop_assert!(events.is_empty(), "{events:?}");
                }
                // An index past the log: the message names it and the next one to come.
                Err(status) if status.code() == Code::OutOfRange => {
                    prop_assert!(last == 0 && number > 0, "{status:?}");
                    prop_assert!(
                        status.message().contains(&number.to_string())
                            && status.message().contains("next event"),
                        "{status:?}"
                    );
                }
                Err(status) => check_status(
                    "Watch",
                    &["service", "instance"],
                    &status,
                    &[Code::InvalidArgument],
                )?,
            }
            Ok(())
        })?;
    }
}
