//! What a Lease says about its holder, read one way by the controller (to stop acting
//! once its Lease is gone) and by `ferrolb why` (to say which controller is active).

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// The holder named by a Lease and how recent its renewal is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub identity: String,
    /// Since the last renewal; `None`: never renewed.
    pub renewed_ago: Option<SignedDuration>,
    /// `leaseDurationSeconds`: how long a renewal holds.
    pub duration: SignedDuration,
}

impl Holder {
    /// The holder of `spec` at `now`, if it names one.
    pub fn of(spec: &LeaseSpec, now: Timestamp) -> Option<Holder> {
        let identity = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
        Some(Holder {
            identity,
            renewed_ago: spec.renew_time.as_ref().map(|t| now.duration_since(t.0)),
            duration: SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or(0),
            )),
        })
    }

    /// How long the Lease stays valid unless renewed: negative once expired, zero when
    /// never renewed.
    pub fn left(&self) -> SignedDuration {
        self.renewed_ago
            .map_or(SignedDuration::ZERO, |ago| self.duration - ago)
    }

    /// Renewed, and not expired since.
    pub fn valid(&self) -> bool {
        self.renewed_ago.is_some() && !self.left().is_negative()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;

    fn spec(
        holder: Option<&str>,
        renewed_secs_ago: Option<i64>,
        duration: i32,
    ) -> (LeaseSpec, Timestamp) {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let spec = LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: renewed_secs_ago.map(|s| MicroTime(now - SignedDuration::from_secs(s))),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        };
        (spec, now)
    }

    #[test]
    fn a_lease_is_valid_until_its_duration_passes_without_renewal() {
        let (s, now) = spec(Some("a"), Some(10), 15);
        let h = Holder::of(&s, now).unwrap();
        assert_eq!((h.left(), h.valid()), (SignedDuration::from_secs(5), true));
        let (s, now) = spec(Some("a"), Some(15), 15);
        assert!(
            Holder::of(&s, now).unwrap().valid(),
            "valid to the last second"
        );
        let (s, now) = spec(Some("a"), Some(20), 15);
        let h = Holder::of(&s, now).unwrap();
        assert_eq!(
            (h.left(), h.valid()),
            (SignedDuration::from_secs(-5), false)
        );
    }

    #[test]
    fn no_holder_and_no_renewal_are_told_apart() {
        for holder in [None, Some("")] {
            let (s, now) = spec(holder, Some(1), 15);
            assert_eq!(Holder::of(&s, now), None);
        }
        let (s, now) = spec(Some("a"), None, 15);
        let h = Holder::of(&s, now).unwrap();
        assert_eq!(
            (h.renewed_ago, h.left(), h.valid()),
            (None, SignedDuration::ZERO, false)
        );
    }
}
