//! The metrics export of one ApiKey: the gauges of its keys (expiry, last use), of its
//! older key still in use, and of its consumers that cannot follow a rotation.

use kube::ResourceExt;

use crate::api::{ApiKey, ApiKeyStatus};
use crate::controller::context::Context;
use crate::controller::pods;
use crate::lifecycle;

/// The gauges of `key` after its reconcile (`status` as written); the consumers' only
/// when known.
pub(super) fn export(
    ctx: &Context,
    key: &ApiKey,
    status: &ApiKeyStatus,
    old_key_in_use: bool,
    consumers: &pods::Consumers,
) {
    export_expiry(ctx, key, status);
    export_usage(ctx, key, status, old_key_in_use);
    if let pods::Consumers::Known(problems) = consumers {
        ctx.metrics.set_consumers_not_following(
            &key.namespace().unwrap_or_default(),
            &key.name_any(),
            problems.len(),
        );
    }
}

/// The active and waiting standby keys' expiries as gauges (for alerts such as "expires
/// within a week and no standby is ready").
fn export_expiry(ctx: &Context, key: &ApiKey, status: &ApiKeyStatus) {
    use crate::api::KeyState;
    use crate::metrics::KeyLabels;
    let labels =
        |role| KeyLabels { namespace: key.namespace().unwrap_or_default(), apikey: key.name_any(), role };
    for (role, k) in [
        ("active", status.keys.iter().find(|k| k.state == KeyState::Active)),
        ("standby", status.keys.iter().find(|k| k.state == KeyState::Standby && k.activated_at.is_none())),
    ] {
        match k.and_then(|k| k.effective_expires_at) {
            Some(t) => {
                ctx.metrics.key_expiry.get_or_create(&labels(role)).set(t.timestamp_millis() as f64 / 1000.0);
            }
            None => {
                ctx.metrics.key_expiry.remove(&labels(role));
            }
        }
    }
}

/// Each valid key's last use as a gauge by slot, and whether the ApiKey's older key is
/// still in use close to its expiry.
fn export_usage(ctx: &Context, key: &ApiKey, status: &ApiKeyStatus, old_key_in_use: bool) {
    use crate::metrics::SlotLabels;
    let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
    for slot in [crate::api::Slot::Primary, crate::api::Slot::Secondary] {
        let labels = SlotLabels {
            namespace: ns.clone(),
            apikey: name.clone(),
            slot: if slot == crate::api::Slot::Primary { "Primary" } else { "Secondary" },
        };
        let used = status
            .keys
            .iter()
            .find(|k| k.slot == slot && lifecycle::is_valid(k))
            .and_then(|k| k.last_used_at);
        match used {
            Some(t) => {
                ctx.metrics.key_last_used.get_or_create(&labels).set(t.timestamp_millis() as f64 / 1000.0);
            }
            None => {
                ctx.metrics.key_last_used.remove(&labels);
            }
        }
    }
    ctx.metrics.set_old_key_in_use(&ns, &name, old_key_in_use);
}
