//! Cloud Map instance attributes: the reserved `AWS_*` ones, the names ECS's own integration uses,
//! and the service's limits, checked before any call so that a bad attribute is a configuration
//! error (exit 2) naming the attribute, not an `InvalidInput` after start-up.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A-record address (needed for A records; one address of the two for SRV).
pub const AWS_INSTANCE_IPV4: &str = "AWS_INSTANCE_IPV4";
/// AAAA-record address.
pub const AWS_INSTANCE_IPV6: &str = "AWS_INSTANCE_IPV6";
/// SRV port (and Route 53 health check port).
pub const AWS_INSTANCE_PORT: &str = "AWS_INSTANCE_PORT";
/// `HEALTHY` | `UNHEALTHY`; only meaningful in services with custom health.
pub const AWS_INIT_HEALTH_STATUS: &str = "AWS_INIT_HEALTH_STATUS";
// The names ECS's own `serviceRegistries` integration sets, mirrored so existing clients keep working.
pub const AVAILABILITY_ZONE: &str = "AVAILABILITY_ZONE";
pub const REGION: &str = "REGION";
pub const ECS_CLUSTER_NAME: &str = "ECS_CLUSTER_NAME";
pub const ECS_SERVICE_NAME: &str = "ECS_SERVICE_NAME";
pub const ECS_TASK_DEFINITION_FAMILY: &str = "ECS_TASK_DEFINITION_FAMILY";
pub const EC2_INSTANCE_ID: &str = "EC2_INSTANCE_ID";
/// The task's full ARN: names its cluster, Region and account, so the sweeper can ask ECS about it.
pub const ECS_TASK_ARN: &str = "ECS_TASK_ARN";
/// Ownership marker: only instances carrying `REGISTERED_BY=cloudmap-sidecar` and an owner
/// (`ECS_TASK_ARN`, else `EC2_INSTANCE_ID`) are ever touched by `cloudmap-sweeper`.
pub const REGISTERED_BY: &str = "REGISTERED_BY";
pub const REGISTERED_BY_SIDECAR: &str = "cloudmap-sidecar";

/// Cloud Map limits (RegisterInstance API reference).
pub const MAX_CUSTOM_ATTRIBUTES: usize = 30;
pub const MAX_KEY_LEN: usize = 255;
pub const MAX_VALUE_LEN: usize = 1024;
pub const MAX_TOTAL_LEN: usize = 5000;
pub const MAX_INSTANCE_ID_LEN: usize = 64;

/// The attribute set of one instance, ordered so logs and requests are stable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes(BTreeMap<String, String>);

impl Attributes {
    /// Insert a value; returns the previous one.
    pub fn insert(&mut self, key: &str, value: &str) -> Option<String> {
        self.0.insert(key.to_string(), value.to_string())
    }

    /// Insert only known values: an unknown attribute is left out, never sent empty.
    pub fn insert_known(&mut self, key: &str, value: Option<&str>) {
        if let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) {
            self.insert(key, v);
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Add every attribute of `other`, keeping ours where both have one.
    pub fn fill_from(&mut self, other: &Attributes) {
        for (k, v) in other.iter() {
            self.0.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
    }

    pub fn to_map(&self) -> std::collections::HashMap<String, String> {
        self.0.clone().into_iter().collect()
    }
}

/// Mark the instance as ours when its owner is known, so the sweeper may remove it once the owner
/// is gone. A `REGISTERED_BY` the operator set is kept (any other value opts out of sweeping).
pub fn mark_owned(attrs: &mut Attributes) {
    let owner_known = attrs.get(ECS_TASK_ARN).is_some() || attrs.get(EC2_INSTANCE_ID).is_some();
    if owner_known && attrs.get(REGISTERED_BY).is_none() {
        attrs.insert(REGISTERED_BY, REGISTERED_BY_SIDECAR);
    }
}

/// A user's `--attribute K=V`: reserved names belong to the sidecar, the rest must fit Cloud Map.
pub fn check_custom(key: &str, value: &str) -> Result<(), String> {
    if key.starts_with("AWS_") {
        return Err(format!(
            "attribute {key}: AWS_* names are reserved and set by the sidecar (use --ip and --port)"
        ));
    }
    check_pair(key, value)
}

fn check_pair(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "attribute key {key:?} must have 1 to {MAX_KEY_LEN} characters"
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "attribute key {key:?} may contain only printable ASCII without spaces"
        ));
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(format!(
            "attribute {key}: value has more than {MAX_VALUE_LEN} characters"
        ));
    }
    if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(format!(
            "attribute {key}: value may contain only printable ASCII (no tabs, newlines or non-ASCII)"
        ));
    }
    if value.starts_with(' ') {
        return Err(format!(
            "attribute {key}: value must not start with whitespace"
        ));
    }
    Ok(())
}

/// Count and size limits over the whole set; `reserved` attributes do not count towards the 30.
pub fn check_totals(attrs: &Attributes) -> Result<(), String> {
    let custom = attrs.iter().filter(|(k, _)| !k.starts_with("AWS_")).count();
    if custom > MAX_CUSTOM_ATTRIBUTES {
        return Err(format!(
            "{custom} custom attributes: Cloud Map accepts at most {MAX_CUSTOM_ATTRIBUTES}"
        ));
    }
    let total: usize = attrs.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_TOTAL_LEN {
        return Err(format!(
            "attribute keys and values add up to {total} characters: Cloud Map accepts at most {MAX_TOTAL_LEN}"
        ));
    }
    Ok(())
}

/// Every attribute of a complete set, as Cloud Map will check it.
pub fn check_all(attrs: &Attributes) -> Result<(), String> {
    for (k, v) in attrs.iter() {
        check_pair(k, v)?;
    }
    check_totals(attrs)
}

/// Cloud Map's instance ID pattern; SRV services additionally need a DNS label (see
/// [`check_dns_label`]).
pub fn check_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_INSTANCE_ID_LEN {
        return Err(format!("must have 1 to {MAX_INSTANCE_ID_LEN} characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_/:.@-".contains(c))
    {
        return Err("may contain only letters, digits and _ / : . @ -".to_string());
    }
    Ok(())
}

/// In SRV services the instance ID becomes a DNS label (`<id>.<service>.<namespace>`).
pub fn check_dns_label(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "instance ID {id:?} is not a DNS label (lower-case letters, digits and -, at most 63), which SRV records need"
        ))
    }
}

/// IPv4 as Cloud Map expects it.
pub fn ipv4_value(ip: Ipv4Addr) -> String {
    ip.to_string()
}

/// IPv6 in canonical lower-case, compressed form (metadata may report `2001:dB8::…`).
pub fn ipv6_value(ip: Ipv6Addr) -> String {
    ip.to_string().to_ascii_lowercase()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_are_refused_from_users() {
        let err = check_custom("AWS_INSTANCE_IPV4", "10.0.0.1").unwrap_err();
        assert!(err.contains("AWS_INSTANCE_IPV4"), "{err}");
    }

    #[test]
    fn keys_and_values_follow_cloud_map_rules() {
        assert!(check_custom("TIER", "ap").is_ok());
        assert!(check_custom("TIER", "has inner spaces").is_ok());
        assert!(check_custom("TIER", "").is_ok());
        assert!(check_custom("", "x").is_err());
        assert!(check_custom("HAS SPACE", "x").is_err());
        assert!(check_custom(&"K".repeat(256), "x").is_err());
        assert!(check_custom(&"K".repeat(255), "x").is_ok());
        assert!(check_custom("K", &"v".repeat(1025)).is_err());
        assert!(check_custom("K", &"v".repeat(1024)).is_ok());
        assert!(check_custom("K", " leading")
            .unwrap_err()
            .contains("whitespace"));
        assert!(check_custom("K", "tab\there").is_err());
        assert!(check_custom("K", "café").unwrap_err().contains("ASCII"));
        assert!(check_custom("KÉ", "x").is_err());
    }

    #[test]
    fn at_most_thirty_custom_attributes_and_5000_characters() {
        let mut attrs = Attributes::default();
        for i in 0..30 {
            attrs.insert(&format!("K{i}"), "v");
        }
        attrs.insert(AWS_INSTANCE_IPV4, "10.0.0.1");
        assert!(check_totals(&attrs).is_ok());
        attrs.insert("K30", "v");
        assert!(check_totals(&attrs).unwrap_err().contains("at most 30"));

        let mut big = Attributes::default();
        for i in 0..5 {
            big.insert(&format!("K{i}"), &"v".repeat(1000));
        }
        assert!(check_totals(&big).unwrap_err().contains("5000"));
    }

    #[test]
    fn unknown_values_are_left_out() {
        let mut attrs = Attributes::default();
        attrs.insert_known(AVAILABILITY_ZONE, None);
        attrs.insert_known(REGION, Some(""));
        attrs.insert_known(ECS_CLUSTER_NAME, Some("prod"));
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs.get(ECS_CLUSTER_NAME), Some("prod"));
    }

    #[test]
    fn only_instances_with_a_known_owner_are_marked_and_an_operator_marker_wins() {
        let mut none = Attributes::default();
        none.insert(REGION, "eu-west-1");
        mark_owned(&mut none);
        assert_eq!(none.get(REGISTERED_BY), None);

        let mut ec2 = Attributes::default();
        ec2.insert(EC2_INSTANCE_ID, "i-0123456789abcdef0");
        mark_owned(&mut ec2);
        assert_eq!(ec2.get(REGISTERED_BY), Some("cloudmap-sidecar"));

        let mut task = Attributes::default();
        task.insert(
            ECS_TASK_ARN,
            "arn:aws:ecs:eu-west-1:111122223333:task/c/0123",
        );
        task.insert(REGISTERED_BY, "manual");
        mark_owned(&mut task);
        assert_eq!(task.get(REGISTERED_BY), Some("manual"));
    }

    #[test]
    fn instance_ids_and_dns_labels() {
        assert!(check_instance_id("0123456789abcdef0123456789abcdef").is_ok());
        assert!(check_instance_id("i-1234567890abcdef0").is_ok());
        assert!(check_instance_id(&"a".repeat(65)).is_err());
        assert!(check_instance_id("has space").is_err());
        assert!(check_dns_label("abc-123").is_ok());
        assert!(check_dns_label("ABC").is_err());
        assert!(check_dns_label(&"a".repeat(64)).is_err());
    }

    #[test]
    fn ipv6_is_sent_in_canonical_lower_case() {
        let ip: Ipv6Addr = "2001:dB8:10:b1a0:b087:d183:3d85:8c0c".parse().unwrap();
        assert_eq!(ipv6_value(ip), "2001:db8:10:b1a0:b087:d183:3d85:8c0c");
        let ip: Ipv6Addr = "2001:0DB8:0000:0000:0000:0000:0000:0001".parse().unwrap();
        assert_eq!(ipv6_value(ip), "2001:db8::1");
    }
}
