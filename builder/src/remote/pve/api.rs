//! Typed answers and calls of the PVE endpoints imagectl uses (nodes, storage, cluster resources,
//! VMs, volumes). PVE sends booleans as 0/1 and some numbers as strings; the types accept both.

use super::{params, seg, PveClient, PveError};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::collections::BTreeMap;

/// 0/1, true/false, "0"/"1" → bool.
pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => b,
        Value::Number(n) => n.as_i64().unwrap_or(0) != 0,
        Value::String(s) => matches!(s.as_str(), "1" | "true"),
        _ => false,
    })
}

/// A number or a numeric string → u64 (absent or other → None).
pub fn num<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    })
}

/// `GET /nodes` item.
#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    /// Node name.
    pub node: String,
    /// `online`, `offline` or `unknown`.
    #[serde(default)]
    pub status: String,
    /// Memory in use (bytes).
    #[serde(default, deserialize_with = "num")]
    pub mem: Option<u64>,
    /// Memory installed (bytes).
    #[serde(default, deserialize_with = "num")]
    pub maxmem: Option<u64>,
}

impl Node {
    /// True when PVE sees the node online.
    pub fn online(&self) -> bool {
        self.status == "online"
    }
}

/// `GET /nodes/{node}/storage` item.
#[derive(Debug, Clone, Deserialize)]
pub struct Storage {
    /// Storage id.
    pub storage: String,
    /// Storage type (dir, lvmthin, rbd, …).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Content types, comma separated.
    #[serde(default)]
    pub content: String,
    /// Shared between nodes.
    #[serde(default, deserialize_with = "flag")]
    pub shared: bool,
    /// Active on this node.
    #[serde(default, deserialize_with = "flag")]
    pub active: bool,
    /// Enabled on this node (absent means enabled).
    #[serde(default = "yes", deserialize_with = "flag")]
    pub enabled: bool,
    /// Free bytes.
    #[serde(default, deserialize_with = "num")]
    pub avail: Option<u64>,
}

fn yes() -> bool {
    true
}

impl Storage {
    /// True if the storage takes this content type.
    pub fn allows(&self, content: &str) -> bool {
        self.content
            .split([',', ';', ' '])
            .any(|c| c.trim() == content)
    }
}

/// `GET /cluster/resources?type=vm` item (VMs and containers).
#[derive(Debug, Clone, Deserialize)]
pub struct Guest {
    /// VM id.
    pub vmid: u32,
    /// Node.
    #[serde(default)]
    pub node: String,
    /// `qemu` or `lxc`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// A template.
    #[serde(default, deserialize_with = "flag")]
    pub template: bool,
    /// Tags, `;`-separated.
    #[serde(default)]
    pub tags: Option<String>,
    /// Size of the boot disk.
    #[serde(default, deserialize_with = "num")]
    pub maxdisk: Option<u64>,
    /// Config lock (create, clone, …).
    #[serde(default)]
    pub lock: Option<String>,
    /// Power status.
    #[serde(default)]
    pub status: Option<String>,
}

impl Guest {
    /// The tags as a list (lower case).
    pub fn tag_list(&self) -> Vec<String> {
        split_tags(self.tags.as_deref().unwrap_or(""))
    }

    /// True if the guest has this tag.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tag_list().iter().any(|t| t == tag)
    }
}

/// Splits PVE's tag list (`;`, `,` or spaces), lower-cased.
pub fn split_tags(tags: &str) -> Vec<String> {
    tags.split([';', ',', ' '])
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// `GET /nodes/{node}/storage/{storage}/content` item.
#[derive(Debug, Clone, Deserialize)]
pub struct Volume {
    /// `STORAGE:NAME`.
    pub volid: String,
    /// Content type.
    #[serde(default)]
    pub content: String,
    /// Bytes.
    #[serde(default, deserialize_with = "num")]
    pub size: Option<u64>,
    /// Owning VM.
    #[serde(default, deserialize_with = "num")]
    pub vmid: Option<u64>,
}

/// A VM's configuration (`GET …/config`): key → value as text.
pub type VmConfig = BTreeMap<String, String>;

fn config_text(v: Value) -> VmConfig {
    match v {
        Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, s)
            })
            .collect(),
        _ => VmConfig::new(),
    }
}

impl PveClient {
    /// `GET /nodes`.
    pub async fn nodes(&self) -> Result<Vec<Node>, PveError> {
        self.get("/nodes", Vec::new()).await
    }

    /// `GET /nodes/{node}/storage`.
    pub async fn storages(&self, node: &str) -> Result<Vec<Storage>, PveError> {
        self.get(&format!("/nodes/{}/storage", seg(node)), Vec::new())
            .await
    }

    /// `GET /cluster/resources?type=vm`: every VM and container of the cluster.
    pub async fn guests(&self) -> Result<Vec<Guest>, PveError> {
        self.get("/cluster/resources", params([("type", "vm")]))
            .await
    }

    /// `GET /cluster/nextid` (does not reserve the id).
    pub async fn next_id(&self) -> Result<u32, PveError> {
        let v: Value = self.get("/cluster/nextid", Vec::new()).await?;
        match &v {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => n.as_u64().map(|n| n as u32),
            _ => None,
        }
        .ok_or_else(|| PveError::decode("GET", "/cluster/nextid", format!("not a VM id: {v}")))
    }

    /// `GET /cluster/nextid?vmid=N`: whether no guest holds `vmid` right now. Like `nextid` it
    /// reserves nothing: pve-manager `PVE/API2/Cluster.pm` (`nextid`) answers the id when the
    /// cluster's VM list lacks it, else a parameter error "VM N already exists" (HTTP 400).
    pub async fn vmid_free(&self, vmid: u32) -> Result<bool, PveError> {
        match self
            .get::<Value>("/cluster/nextid", params([("vmid", vmid)]))
            .await
        {
            Ok(_) => Ok(true),
            Err(e @ PveError::Api { .. })
                if e.status() == Some(400)
                    && matches!(&e, PveError::Api { errors, .. }
                        if errors.get("vmid").is_some_and(|m| m.contains("already exists"))) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// `GET /nodes/{node}/qemu/{vmid}/config`.
    pub async fn vm_config(&self, node: &str, vmid: u32) -> Result<VmConfig, PveError> {
        let v: Value = self
            .get(
                &format!("/nodes/{}/qemu/{vmid}/config", seg(node)),
                Vec::new(),
            )
            .await?;
        Ok(config_text(v))
    }

    /// `GET /nodes/{node}/storage/{storage}/content[?content=…]`.
    pub async fn volumes(
        &self,
        node: &str,
        storage: &str,
        content: Option<&str>,
    ) -> Result<Vec<Volume>, PveError> {
        let q = content
            .map(|c| params([("content", c)]))
            .unwrap_or_default();
        self.get(
            &format!("/nodes/{}/storage/{}/content", seg(node), seg(storage)),
            q,
        )
        .await
    }

    /// Deletes a volume and waits for the task (PVE may answer synchronously).
    pub async fn delete_volume(&self, node: &str, volid: &str) -> Result<(), PveError> {
        let storage = volid.split(':').next().unwrap_or_default();
        let path = format!(
            "/nodes/{}/storage/{}/content/{}",
            seg(node),
            seg(storage),
            seg(volid)
        );
        let upid: Option<String> = self.delete(&path, Vec::new()).await?;
        if let Some(upid) = upid.filter(|u| u.starts_with("UPID:")) {
            self.wait_task(&upid, self.options().task_timeout).await?;
        }
        Ok(())
    }

    /// Destroys a VM with its disks (`purge`, `destroy-unreferenced-disks`) and waits.
    pub async fn destroy_vm(&self, node: &str, vmid: u32) -> Result<(), PveError> {
        let path = format!("/nodes/{}/qemu/{vmid}", seg(node));
        let upid: Option<String> = self
            .delete(
                &path,
                params([("purge", "1"), ("destroy-unreferenced-disks", "1")]),
            )
            .await?;
        if let Some(upid) = upid.filter(|u| u.starts_with("UPID:")) {
            self.wait_task(&upid, self.options().task_timeout).await?;
        }
        Ok(())
    }
}
