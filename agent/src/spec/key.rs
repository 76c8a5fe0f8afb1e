//! The identity of one instance slot: its service and its index. Its text form is the
//! instance id users see and name (`web-2`), the one [`instance_id`] writes.

use std::fmt;
use std::str::FromStr;

use super::validate::{instance_id, valid_service_name};

/// Instance `index` of `service`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    pub service: String,
    pub index: u32,
}

impl InstanceKey {
    pub fn new(service: &str, index: u32) -> InstanceKey {
        InstanceKey {
            service: service.to_string(),
            index,
        }
    }
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&instance_id(&self.service, self.index))
    }
}

/// The text is not an instance id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an instance id (like \"web-2\")")]
pub struct NotAnInstanceId(pub String);

impl FromStr for InstanceKey {
    type Err = NotAnInstanceId;

    /// Only the canonical form: a valid service name, `-`, the index in decimal without
    /// leading zeros (`web-02` names no instance).
    fn from_str(s: &str) -> Result<InstanceKey, NotAnInstanceId> {
        let refuse = || NotAnInstanceId(s.chars().take(80).collect());
        let (service, index) = s.rsplit_once('-').ok_or_else(refuse)?;
        let canonical = valid_service_name(service)
            && index.bytes().all(|b| b.is_ascii_digit())
            && (index == "0" || !index.starts_with('0'));
        if !canonical {
            return Err(refuse());
        }
        let index = index.parse().map_err(|_| refuse())?;
        Ok(InstanceKey::new(service, index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_only_canonical_ones_parse() {
        for (text, want) in [
            ("web-0", Some(("web", 0))),
            ("web-2", Some(("web", 2))),
            ("my-api-10", Some(("my-api", 10))),
            ("0-4294967295", Some(("0", u32::MAX))),
            ("web-02", None),
            ("web-", None),
            ("-1", None),
            ("web", None),
            ("web-x", None),
            ("web-+1", None),
            ("Web-1", None),
            ("web-4294967296", None),
            ("../x-1", None),
        ] {
            let parsed = text.parse::<InstanceKey>().ok();
            assert_eq!(
                parsed,
                want.map(|(s, i)| InstanceKey::new(s, i)),
                "{text:?}"
            );
            if let Some(key) = parsed {
                assert_eq!(key.to_string(), text);
            }
        }
    }
}
