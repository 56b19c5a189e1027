//! The import volume of a publish: which volume PVE really stored, and removing it for sure.
//!
//! PVE stores an upload or a `download-url` file under its normalised name (pve-storage
//! `src/PVE/Storage.pm` `normalize_content_filename`, see [`content_filename`]), not under the
//! name sent, and a `DELETE …/content/{volid}` of a volume that does not exist succeeds with only
//! a warning (pve-storage `src/PVE/Storage/Plugin.pm` `free_image`: "disk image … does not
//! exist"). So imagectl computes the name as PVE does, then takes the volume id from what PVE
//! reports — the upload task's `target file:` line (`upload` in `src/PVE/API2/Storage/Status.pm`
//! prints it) and the storage's content list — and after a delete checks that the volume is gone.

use crate::remote::pve::upload::content_filename;
use crate::remote::pve::PveClient;
use anyhow::{anyhow, Result};

/// `STORAGE:import/NAME` for the file name PVE stores `sent` under.
pub fn expected_volid(storage: &str, sent: &str) -> String {
    format!("{storage}:import/{}", content_filename(sent))
}

/// The file name in the last `target file: /path/to/NAME` line of an upload task's log.
pub fn target_file_name(log: &[String]) -> Option<String> {
    log.iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix("target file:"))
        .and_then(|p| p.trim().rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// The volume id of the import that task `upid` (finished, OK) stored on `node`/`storage` for a
/// file sent as `sent`: the name the task log reports (else PVE's normalised name), confirmed by
/// the storage's content list. Errors when the list is readable and lacks the volume.
pub async fn stored_volid(
    pve: &PveClient,
    node: &str,
    storage: &str,
    upid: &str,
    sent: &str,
) -> Result<String> {
    let log = pve.task_log_tail(node, upid, 200).await;
    let name = target_file_name(&log).unwrap_or_else(|| content_filename(sent));
    let volid = format!("{storage}:import/{name}");
    let listed = match pve.volumes(node, storage, Some("import")).await {
        Ok(v) => v,
        Err(e) => {
            // Listing needs Datastore.Audit; without it the task log's name has to do.
            tracing::warn!("cannot list the import volumes of {storage} on {node}: {e}");
            return Ok(volid);
        }
    };
    if listed.iter().any(|v| v.volid == volid) {
        return Ok(volid);
    }
    let seen: Vec<&str> = listed.iter().map(|v| v.volid.as_str()).take(10).collect();
    Err(anyhow!(
        "the upload task finished, but {storage} on {node} has no volume {volid} \
         (PVE stores `{sent}` as `{}`; import volumes there: {})",
        content_filename(sent),
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    ))
}

/// Deletes import volume `volid` on `node` and checks that the storage no longer lists it (PVE
/// reports success for a volume that does not exist). A volume that is already gone is fine.
pub async fn remove(pve: &PveClient, node: &str, volid: &str) -> Result<(), String> {
    if let Err(e) = pve.delete_volume(node, volid).await {
        if !e.is_not_found() {
            return Err(format!("removing {volid} on {node}: {e}"));
        }
    }
    let storage = volid.split(':').next().unwrap_or_default();
    match pve.volumes(node, storage, Some("import")).await {
        Ok(list) if list.iter().any(|v| v.volid == volid) => Err(format!(
            "PVE reported {volid} on {node} removed, but the storage still lists it"
        )),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!("cannot check that {volid} on {node} is gone: {e}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volids_use_the_stored_name() {
        assert_eq!(
            expected_volid("local", "imagectl-gitlab-runner-2.0+b1.qcow2"),
            "local:import/imagectl-gitlab-runner-2.0_b1.qcow2"
        );
        let log: Vec<String> = [
            "starting file import from: /var/tmp/pveupload-0a1b",
            "target node: pve1",
            "target file: /var/lib/vz/import/imagectl-x-2.0_b1.qcow2",
            "file size is: 65536",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            target_file_name(&log).as_deref(),
            Some("imagectl-x-2.0_b1.qcow2")
        );
        assert_eq!(target_file_name(&["TASK OK".to_string()]), None);
    }
}
