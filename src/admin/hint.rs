//! Matching a key we hold to the Admin API's listing by `partial_key_hint`, and the decision
//! what retiring it means. Pure: no network, unit-tested here.

use super::client::{ApiKey, KeyStatus};

/// The Admin API's `partial_key_hint` of a key: its prefix through the kind segment
/// (`sk-ant-api03-`), the next three characters, `...`, and the last four
/// (`sk-ant-api03-R2D...igAA`). `None` when the key is too short to have one.
pub fn partial_key_hint(key: &str) -> Option<String> {
    let prefix_end = key.match_indices('-').nth(2).map(|(i, _)| i + 1)?;
    let rest: Vec<char> = key[prefix_end..].chars().collect();
    if rest.len() < 7 {
        return None;
    }
    let head: String = rest[..3].iter().collect();
    let tail: String = rest[rest.len() - 4..].iter().collect();
    Some(format!("{}{head}...{tail}", &key[..prefix_end]))
}

/// Which listed key a hint names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    Unique(ApiKey),
    None,
    /// Two or more keys share the hint: we never guess which one to deactivate.
    Ambiguous(Vec<String>),
}

/// Finds the keys whose hint equals `hint`, optionally only in `workspace` (`Some(None)` means
/// the default workspace, whose keys have no `workspace_id`). Archived keys are skipped: they
/// can no longer be used or changed.
pub fn find_by_hint(keys: &[ApiKey], hint: &str, workspace: Option<Option<&str>>) -> Match {
    let found: Vec<&ApiKey> = keys
        .iter()
        .filter(|k| k.partial_key_hint.as_deref() == Some(hint))
        .filter(|k| k.status != KeyStatus::Archived)
        .filter(|k| workspace.is_none_or(|w| k.workspace_id.as_deref() == w))
        .collect();
    match found.as_slice() {
        [] => Match::None,
        [one] => Match::Unique((*one).clone()),
        many => Match::Ambiguous(many.iter().map(|k| k.id.clone()).collect()),
    }
}

/// What to do with a matched key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetireAction {
    /// Set it `inactive`.
    Deactivate(String),
    /// Already inactive: nothing to do, report success.
    AlreadyInactive(String),
    /// Nothing matched uniquely, or the status is one we do not act on.
    Refuse(RetireRefusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetireRefusal {
    NotFound,
    Ambiguous(Vec<String>),
    UnknownStatus(String),
}

/// The retirement decision for a match.
pub fn decide(found: Match) -> RetireAction {
    match found {
        Match::Unique(key) => match key.status {
            KeyStatus::Active => RetireAction::Deactivate(key.id),
            KeyStatus::Inactive | KeyStatus::Archived => RetireAction::AlreadyInactive(key.id),
            KeyStatus::Unknown => RetireAction::Refuse(RetireRefusal::UnknownStatus(key.id)),
        },
        Match::None => RetireAction::Refuse(RetireRefusal::NotFound),
        Match::Ambiguous(ids) => RetireAction::Refuse(RetireRefusal::Ambiguous(ids)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, hint: &str, status: KeyStatus, ws: Option<&str>) -> ApiKey {
        ApiKey {
            id: id.into(),
            name: id.into(),
            status,
            partial_key_hint: Some(hint.into()),
            workspace_id: ws.map(Into::into),
        }
    }

    #[test]
    fn hint_matches_the_api_and_the_fake() {
        let k = "sk-ant-api03-R2Dxxxxxxxxxxxxxxxxxxxxxxxx-igAA";
        assert_eq!(
            partial_key_hint(k).as_deref(),
            Some("sk-ant-api03-R2D...igAA")
        );
        assert_eq!(
            partial_key_hint(k),
            Some(crate::fake_upstream::partial_key_hint(k))
        );
        assert_eq!(partial_key_hint("sk-ant-api03-abc"), None);
        assert_eq!(partial_key_hint("nodashes"), None);
    }

    #[test]
    fn unique_none_ambiguous_and_workspace() {
        let h = "sk-ant-api03-R2D...igAA";
        let keys = vec![
            key("a", h, KeyStatus::Active, Some("wrkspc_1")),
            key("b", h, KeyStatus::Active, None),
            key("c", "sk-ant-api03-Zzz...0000", KeyStatus::Active, None),
            key("d", h, KeyStatus::Archived, None),
        ];
        assert_eq!(
            find_by_hint(&keys, h, None),
            Match::Ambiguous(vec!["a".into(), "b".into()])
        );
        assert!(
            matches!(find_by_hint(&keys, h, Some(Some("wrkspc_1"))), Match::Unique(k) if k.id == "a")
        );
        assert!(matches!(find_by_hint(&keys, h, Some(None)), Match::Unique(k) if k.id == "b"));
        assert_eq!(
            find_by_hint(&keys, "sk-ant-api03-nop...nope", None),
            Match::None
        );
    }

    #[test]
    fn decisions_never_guess() {
        let h = "x";
        assert_eq!(
            decide(Match::Unique(key("a", h, KeyStatus::Active, None))),
            RetireAction::Deactivate("a".into())
        );
        assert_eq!(
            decide(Match::Unique(key("a", h, KeyStatus::Inactive, None))),
            RetireAction::AlreadyInactive("a".into())
        );
        assert_eq!(
            decide(Match::Unique(key("a", h, KeyStatus::Unknown, None))),
            RetireAction::Refuse(RetireRefusal::UnknownStatus("a".into()))
        );
        assert_eq!(
            decide(Match::None),
            RetireAction::Refuse(RetireRefusal::NotFound)
        );
        assert_eq!(
            decide(Match::Ambiguous(vec!["a".into(), "b".into()])),
            RetireAction::Refuse(RetireRefusal::Ambiguous(vec!["a".into(), "b".into()]))
        );
    }
}
