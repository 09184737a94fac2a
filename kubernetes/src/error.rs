//! API errors, sorted once into what ferrolb does about them: every caller matches on
//! [`ApiError`], never on a status code, and every error counts under its
//! [`ApiError::label`].

use std::fmt;

use kube::runtime::watcher;

/// What went wrong with a request, as far as ferrolb acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiError {
    /// 404: the object (or its kind: a CRD not installed) does not exist.
    NotFound { message: String },
    /// 409: the object changed since it was read; decide again from the newer one.
    Conflict { message: String },
    /// 401/403: the ServiceAccount may not do this. Retrying does not help until
    /// someone changes RBAC, so it is retried slowly.
    Forbidden { message: String },
    /// 410: a list or watch resumed from a version the API server no longer has.
    Gone { message: String },
    /// 400/422: the API server refused what was sent; `field` is the first field it
    /// named, when it named one.
    Invalid {
        field: Option<String>,
        message: String,
    },
    /// Anything that may pass by itself: 429, 5xx, timeouts, connection errors.
    Transient { message: String },
}

/// Whether to try a failed request again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// No: the object is gone, or the request itself is wrong.
    No,
    /// Yes, after the next delay of the [`crate::retry::Backoff`].
    Backoff,
}

impl ApiError {
    pub fn from_kube(e: &kube::Error) -> ApiError {
        let kube::Error::Api(s) = e else {
            return ApiError::Transient {
                message: e.to_string(),
            };
        };
        let message = s.message.clone();
        match s.code {
            404 => ApiError::NotFound { message },
            409 => ApiError::Conflict { message },
            401 | 403 => ApiError::Forbidden { message },
            410 => ApiError::Gone { message },
            400 | 422 => ApiError::Invalid {
                field: s
                    .details
                    .as_ref()
                    .and_then(|d| d.causes.iter().find(|c| !c.field.is_empty()))
                    .map(|c| c.field.clone()),
                message,
            },
            _ => ApiError::Transient { message },
        }
    }

    /// The error of a watch's list or watch request, when it came from one.
    pub fn from_watcher(e: &watcher::Error) -> ApiError {
        match e {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => ApiError::from_kube(e),
            watcher::Error::WatchError(s) if s.code == 410 => ApiError::Gone {
                message: s.message.clone(),
            },
            other => ApiError::Transient {
                message: other.to_string(),
            },
        }
    }

    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::Gone { .. } => "gone",
            ApiError::Invalid { .. } => "invalid",
            ApiError::Transient { .. } => "transient",
        }
    }

    pub fn retry(&self) -> Retry {
        match self {
            ApiError::NotFound { .. } | ApiError::Invalid { .. } => Retry::No,
            ApiError::Conflict { .. }
            | ApiError::Forbidden { .. }
            | ApiError::Gone { .. }
            | ApiError::Transient { .. } => Retry::Backoff,
        }
    }

    /// What to do about it, when ferrolb knows: `role` is `controller` or `speaker`
    /// (whose ServiceAccount and docs page to name), `verb` and `resource` what failed.
    pub fn hint(&self, role: &str, verb: &str, resource: &str) -> Option<String> {
        match self {
            ApiError::Forbidden { .. } => Some(format!(
                "the {role}'s ServiceAccount needs {verb} on {resource} (see docs/{role}.md, RBAC)"
            )),
            ApiError::NotFound { .. } if verb.contains("list") || verb.contains("watch") => Some(
                format!("is the {resource} CRD installed? (`ferrolb crds | kubectl apply -f -`)"),
            ),
            _ => None,
        }
    }

    /// The error, then what to do about it (see [`ApiError::hint`]).
    pub fn explain(&self, role: &str, verb: &str, resource: &str) -> String {
        match self.hint(role, verb, resource) {
            Some(hint) => format!("{self}; {hint}"),
            None => self.to_string(),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::NotFound { message } => write!(f, "not found: {message}"),
            ApiError::Conflict { message } => write!(f, "conflict: {message}"),
            ApiError::Forbidden { message } => write!(f, "forbidden: {message}"),
            ApiError::Gone { message } => write!(f, "expired: {message}"),
            ApiError::Invalid {
                field: Some(field),
                message,
            } => write!(f, "refused ({field}): {message}"),
            ApiError::Invalid {
                field: None,
                message,
            } => write!(f, "refused: {message}"),
            ApiError::Transient { message } => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// What a failed watch of `resource` means and what to do, for the log and `/readyz`.
pub fn explain_watch(role: &str, resource: &str, e: &watcher::Error) -> String {
    match ApiError::from_watcher(e).hint(role, "list and watch", resource) {
        Some(hint) => format!("{e}; {hint}"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn api(code: u16, message: &str) -> kube::Error {
        let mut s = Status::failure(message, "Reason");
        s.code = code;
        kube::Error::Api(Box::new(s))
    }

    #[test]
    fn status_codes_sort_into_kinds_with_a_label_and_a_retry() {
        for (code, label, retry) in [
            (404, "not_found", Retry::No),
            (409, "conflict", Retry::Backoff),
            (401, "forbidden", Retry::Backoff),
            (403, "forbidden", Retry::Backoff),
            (410, "gone", Retry::Backoff),
            (422, "invalid", Retry::No),
            (400, "invalid", Retry::No),
            (429, "transient", Retry::Backoff),
            (500, "transient", Retry::Backoff),
            (503, "transient", Retry::Backoff),
        ] {
            let e = ApiError::from_kube(&api(code, "m"));
            assert_eq!((e.label(), e.retry()), (label, retry), "code {code}");
        }
    }

    #[test]
    fn an_invalid_object_names_the_field() {
        // As the API server sends it.
        let s: Status = serde_json::from_value(serde_json::json!({
            "status": "Failure",
            "message": "IPAddressPool.ferrolb.io \"p\" is invalid",
            "reason": "Invalid",
            "code": 422,
            "details": {"causes": [
                {"reason": "FieldValueInvalid", "message": "must be a CIDR", "field": "spec.addresses[0]"}
            ]}
        }))
        .unwrap();
        let e = ApiError::from_kube(&kube::Error::Api(Box::new(s)));
        assert_eq!(
            e.to_string(),
            "refused (spec.addresses[0]): IPAddressPool.ferrolb.io \"p\" is invalid"
        );
    }

    #[test]
    fn forbidden_names_the_service_account_rule_and_the_docs() {
        let e = ApiError::from_kube(&api(403, "ipaddresspools.ferrolb.io \"p\" is forbidden"));
        assert_eq!(
            e.explain("controller", "patch", "ipaddresspools/status"),
            "forbidden: ipaddresspools.ferrolb.io \"p\" is forbidden; the controller's \
             ServiceAccount needs patch on ipaddresspools/status (see docs/controller.md, RBAC)"
        );
        let watch = watcher::Error::InitialListFailed(api(403, "services is forbidden"));
        assert!(
            explain_watch("speaker", "services", &watch)
                .ends_with("; the speaker's ServiceAccount needs list and watch on services (see docs/speaker.md, RBAC)"),
            "{}",
            explain_watch("speaker", "services", &watch)
        );
        let missing = watcher::Error::InitialListFailed(api(
            404,
            "the server could not find the requested resource",
        ));
        assert!(
            explain_watch("speaker", "ipaddresspools", &missing).ends_with(
                "; is the ipaddresspools CRD installed? (`ferrolb crds | kubectl apply -f -`)"
            )
        );
    }
}
