//! The one shape of every Kubernetes Event claudekey records: the controller's on a ClaudeKey,
//! the retirer's on a source and `claudekey revoke`'s. Publishing stays with each caller, which
//! alone knows where a failure to record should be reported.

use kube::runtime::events::{Event, EventType};

/// `Warning` when something needs a person's attention, else `Normal`.
pub fn event_type(warning: bool) -> EventType {
    if warning {
        EventType::Warning
    } else {
        EventType::Normal
    }
}

/// An Event of `action` (what claudekey was doing) for `reason` (a CamelCase constant) with a
/// note for people. The note must never hold a key: Events are readable by anyone who can read
/// the object.
pub fn event(type_: EventType, action: &str, reason: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    }
}
