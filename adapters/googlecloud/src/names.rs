//! Pub/Sub resource names: topics and the subscriptions derived from topic + group.

use tidemill_core::{Error, Result};

use crate::BROKER;

/// A topic: its full name and its id (the last path segment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TopicName {
    /// `projects/{project}/topics/{id}`.
    pub path: String,
    /// `{id}`.
    pub id: String,
}

/// Resolves `topic` (an id, or a full `projects/P/topics/T` name) in `project`.
pub(crate) fn topic_name(project: &str, topic: &str) -> Result<TopicName> {
    let (project, id) = match topic.strip_prefix("projects/") {
        Some(rest) => match rest.split_once("/topics/") {
            Some((p, id)) if !p.is_empty() && !p.contains('/') => (p, id),
            _ => {
                return Err(invalid(
                    topic,
                    "a full topic name must look like `projects/PROJECT/topics/TOPIC`".into(),
                ))
            }
        },
        None => (project, topic),
    };
    validate_id(id).map_err(|why| invalid(topic, format!("topic {why}")))?;
    Ok(TopicName {
        path: format!("projects/{project}/topics/{id}"),
        id: id.to_owned(),
    })
}

/// The subscription of `group` on `topic`: `projects/{project}/subscriptions/{prefix}{topic}.{group}`.
pub(crate) fn group_subscription(
    project: &str,
    prefix: &str,
    topic: &TopicName,
    group: &str,
) -> Result<String> {
    let id = format!("{prefix}{}.{group}", topic.id);
    validate_id(&id).map_err(|why| {
        invalid(
            &topic.path,
            format!("the subscription name derived from consumer group `{group}` ({id:?}) {why}"),
        )
    })?;
    Ok(format!("projects/{project}/subscriptions/{id}"))
}

/// A fresh subscription for one subscribe call without a group.
pub(crate) fn unique_subscription(
    project: &str,
    prefix: &str,
    topic: &TopicName,
) -> Result<String> {
    let random = uuid::Uuid::new_v4().simple().to_string();
    let id = format!("{prefix}{}.tidemill-{}", topic.id, &random[..16]);
    validate_id(&id).map_err(|why| {
        invalid(
            &topic.path,
            format!("the derived subscription name {id:?} {why}"),
        )
    })?;
    Ok(format!("projects/{project}/subscriptions/{id}"))
}

/// Pub/Sub's rule for topic and subscription ids: 3 to 255 characters, starting with a
/// letter, of letters, digits and `-_.~+%`, not starting with `goog`.
pub(crate) fn validate_id(id: &str) -> std::result::Result<(), String> {
    if id.len() < 3 || id.len() > 255 {
        return Err(format!(
            "must be 3 to 255 characters long, {id:?} has {}",
            id.len()
        ));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!("must start with a letter: {id:?}"));
    }
    if id.to_ascii_lowercase().starts_with("goog") {
        return Err(format!("must not start with `goog`: {id:?}"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.~+%".contains(*c)))
    {
        return Err(format!(
            "may only contain letters, digits and `-_.~+%`, {id:?} contains {c:?}"
        ));
    }
    Ok(())
}

fn invalid(topic: &str, why: String) -> Error {
    Error::permanent(BROKER, topic, "invalid resource name", why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_resolve_in_the_configured_project_or_their_own() {
        let t = topic_name("proj-a", "orders").unwrap();
        assert_eq!(t.path, "projects/proj-a/topics/orders");
        assert_eq!(t.id, "orders");
        let t = topic_name("proj-a", "projects/proj-b/topics/events").unwrap();
        assert_eq!(t.path, "projects/proj-b/topics/events");
        assert_eq!(t.id, "events");
        for bad in [
            "projects/x",
            "projects//topics/abc",
            "a",
            "9lives",
            "goog-x",
            "a b c",
        ] {
            let err = topic_name("proj-a", bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
            assert!(!err.is_transient());
        }
    }

    #[test]
    fn subscriptions_are_named_from_topic_and_group() {
        let t = topic_name("p", "orders").unwrap();
        assert_eq!(
            group_subscription("p", "", &t, "billing").unwrap(),
            "projects/p/subscriptions/orders.billing"
        );
        assert_eq!(
            group_subscription("p", "svc-", &t, "billing").unwrap(),
            "projects/p/subscriptions/svc-orders.billing"
        );
        let err = group_subscription("p", "", &t, "bad group").unwrap_err();
        assert!(err.to_string().contains("bad group"), "{err}");
        let a = unique_subscription("p", "", &t).unwrap();
        let b = unique_subscription("p", "", &t).unwrap();
        assert_ne!(a, b);
        assert!(
            a.starts_with("projects/p/subscriptions/orders.tidemill-"),
            "{a}"
        );
    }
}
