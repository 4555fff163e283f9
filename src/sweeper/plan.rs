//! The decision of one pass, with its safety rails, as a pure function of what was listed and what
//! the owners' APIs said: which instances to remove, which to keep and why.

use super::owner::{Owner, OwnerState};

/// A marked instance and what its owner's API said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub instance_id: String,
    pub owner: Owner,
    pub state: OwnerState,
}

/// An instance to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub instance_id: String,
    pub owner: Owner,
    /// Why its owner counts as gone (`STOPPED`, `MISSING`, `terminated`, …).
    pub reason: String,
}

/// What one pass will do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Instances in the service, of any origin.
    pub total: usize,
    /// To deregister (empty when the pass was refused).
    pub remove: Vec<Removal>,
    /// Stale, but held back because removing it would leave the service empty.
    pub kept_last: Option<Removal>,
    /// The whole pass was refused by `--max-fraction`: the reason, said to the operator.
    pub refused: Option<String>,
    /// Marked instances whose owner could not be checked: (instance, why). Never removed.
    pub unverified: Vec<(String, String)>,
    /// Marked instances whose owner still runs.
    pub alive: usize,
}

impl Plan {
    /// Stale instances that this pass leaves registered on purpose (rails), or instances it could
    /// not judge: the operator should look.
    pub fn incomplete(&self) -> bool {
        self.refused.is_some() || self.kept_last.is_some() || !self.unverified.is_empty()
    }
}

/// Decide a pass. `total` counts every instance of the service (foreign ones too): the rails
/// protect the service, not just our share of it.
///
/// Rails, in order: only owners reported gone are candidates (an unknown owner is kept); the
/// service is never emptied (the last stale instance, in instance-ID order, is kept); a pass that
/// would remove more than `max_fraction` of `total` removes nothing.
pub fn decide(total: usize, checked: Vec<Checked>, max_fraction: f64) -> Plan {
    let mut plan = Plan {
        total,
        ..Plan::default()
    };
    let mut stale: Vec<Removal> = Vec::new();
    for c in checked {
        match c.state {
            OwnerState::Alive(_) => plan.alive += 1,
            OwnerState::Unknown(why) => plan.unverified.push((c.instance_id, why)),
            OwnerState::Gone(reason) => stale.push(Removal {
                instance_id: c.instance_id,
                owner: c.owner,
                reason,
            }),
        }
    }
    stale.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    // `total` comes from the same listing; a smaller one would be a caller bug, never a reason to
    // remove everything.
    if stale.len() >= total {
        plan.kept_last = stale.pop();
    }
    // The count, not a rounded percentage, is compared: 2 of 4 is 50 % and allowed at 0.5.
    #[allow(clippy::cast_precision_loss)]
    let allowed = max_fraction * total as f64;
    #[allow(clippy::cast_precision_loss)]
    if stale.len() as f64 > allowed + 1e-9 {
        plan.refused = Some(format!(
            "refusing to remove {} of {} instances: more than --max-fraction {}% of the service; \
             removing nothing (check the owners' state, or raise --max-fraction for one run)",
            stale.len(),
            total,
            max_fraction * 100.0
        ));
        plan.unverified.sort();
        return plan;
    }
    plan.remove = stale;
    plan.unverified.sort();
    plan
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn task(n: usize) -> Owner {
        Owner::EcsTask {
            cluster: "arn:aws:ecs:us-east-1:123456789012:cluster/c".into(),
            task_arn: format!("arn:aws:ecs:us-east-1:123456789012:task/c/{n:032}"),
        }
    }

    fn checked(n: usize, state: OwnerState) -> Checked {
        Checked {
            instance_id: format!("i{n}"),
            owner: task(n),
            state,
        }
    }

    fn gone(n: usize) -> Checked {
        checked(n, OwnerState::Gone("STOPPED".into()))
    }

    fn ids(plan: &Plan) -> Vec<&str> {
        plan.remove.iter().map(|r| r.instance_id.as_str()).collect()
    }

    #[test]
    fn only_owners_reported_gone_are_removed() {
        let plan = decide(
            6,
            vec![
                gone(1),
                checked(2, OwnerState::Alive("RUNNING".into())),
                checked(3, OwnerState::Unknown("DescribeTasks failed".into())),
            ],
            0.5,
        );
        assert_eq!(ids(&plan), ["i1"]);
        assert_eq!(plan.alive, 1);
        assert_eq!(
            plan.unverified,
            [("i3".to_string(), "DescribeTasks failed".to_string())]
        );
        assert!(plan.incomplete());
        assert_eq!(plan.remove[0].reason, "STOPPED");
    }

    #[test]
    fn a_pass_never_empties_the_service() {
        let plan = decide(1, vec![gone(1)], 1.0);
        assert!(plan.remove.is_empty());
        assert_eq!(plan.kept_last.as_ref().unwrap().instance_id, "i1");

        let plan = decide(3, vec![gone(3), gone(1), gone(2)], 1.0);
        assert_eq!(ids(&plan), ["i1", "i2"]);
        assert_eq!(plan.kept_last.unwrap().instance_id, "i3");
        assert!(plan.refused.is_none());
    }

    #[test]
    fn more_than_the_fraction_removes_nothing_and_says_so() {
        let plan = decide(4, vec![gone(1), gone(2), gone(3)], 0.5);
        assert!(plan.remove.is_empty());
        let why = plan.refused.unwrap();
        assert!(why.contains("refusing to remove 3 of 4"), "{why}");
        assert!(why.contains("--max-fraction 50%"), "{why}");
    }

    #[test]
    fn exactly_the_fraction_is_allowed() {
        let plan = decide(4, vec![gone(1), gone(2)], 0.5);
        assert_eq!(ids(&plan), ["i1", "i2"]);
        assert!(!plan.incomplete());
        let plan = decide(10, vec![gone(1), gone(2), gone(3)], 0.3);
        assert_eq!(plan.remove.len(), 3);
    }

    #[test]
    fn a_total_smaller_than_the_stale_count_still_keeps_one() {
        let plan = decide(0, vec![gone(1)], 1.0);
        assert!(plan.remove.is_empty());
        assert!(plan.kept_last.is_some());
    }

    #[test]
    fn nothing_stale_is_a_complete_pass() {
        let plan = decide(
            2,
            vec![checked(1, OwnerState::Alive("RUNNING".into()))],
            0.5,
        );
        assert!(plan.remove.is_empty());
        assert!(!plan.incomplete());
    }
}
