//! Unit tests of the seed renderer and its validation.

use super::*;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx7yQk0bxQ2cW0s8lR4h1mZ4cM3H0Vt2m9yq0x6Y1pK ops@example";

fn agent() -> AgentSeed {
    serde_json::from_str(
        r#"{"version":1,"gitlab_url":"https://gitlab.example.com","runner_token":"glrt-SECRET123","runner_id":7,"runner_name":"imagectl/ci/vm1"}"#,
    )
    .unwrap()
}

#[test]
fn hostnames_are_checked() {
    for ok in ["runner-1", "a", "ci-01.example.com"] {
        validate_hostname(ok).unwrap();
    }
    for bad in ["", "-x", "x-", "Upper", "a_b", "a..b", &"x".repeat(64)] {
        let e = validate_hostname(bad).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2, "{bad}");
    }
}

#[test]
fn instance_ids_are_unique_and_valid() {
    let a = generate_instance_id("ci-01.example.com");
    let b = generate_instance_id("ci-01.example.com");
    assert_ne!(a, b);
    assert!(a.starts_with("iid-ci-01-"), "{a}");
    validate_instance_id(&a).unwrap();
    assert!(validate_instance_id("has space").is_err());
}

#[test]
fn user_data_has_hostname_and_keys_but_no_token() {
    let mut cfg = SeedConfig::new("ci-01.example.com").unwrap();
    cfg.admin = Some(AdminUser {
        name: "ops".into(),
        ssh_authorized_keys: vec![KEY.into()],
    });
    cfg.agent = Some(agent());
    let f = render(&cfg).unwrap();
    assert!(f.user_data.starts_with("#cloud-config\n"));
    let v: Value = serde_yaml::from_str(&f.user_data).unwrap();
    assert_eq!(v["hostname"], yaml_str("ci-01"));
    assert_eq!(v["fqdn"], yaml_str("ci-01.example.com"));
    assert_eq!(v["preserve_hostname"], Value::Bool(false));
    assert_eq!(v["package_update"], Value::Bool(false));
    assert_eq!(v["users"][0]["name"], yaml_str("ops"));
    assert_eq!(v["users"][0]["ssh_authorized_keys"][0], yaml_str(KEY));
    assert!(!f.user_data.contains("glrt-"));
    assert!(f.agent_json().unwrap().contains("glrt-SECRET123"));
    assert!(!format!("{f:?}").contains("glrt-"));
    assert!(f
        .meta_data
        .contains(&format!("instance-id: {}\n", cfg.instance_id)));
    assert!(f.meta_data.contains("local-hostname: ci-01.example.com\n"));
}

#[test]
fn static_network_is_rendered() {
    let mut cfg = SeedConfig::new("h").unwrap();
    cfg.network = Network::Static(StaticNet {
        address: "192.0.2.10/24".into(),
        gateway: Some("192.0.2.1".parse().unwrap()),
        dns: vec!["192.0.2.53".parse().unwrap()],
    });
    let v: Value = serde_yaml::from_str(&render(&cfg).unwrap().network_config).unwrap();
    let p = &v["ethernets"]["eth0"];
    assert_eq!(v["version"], Value::Number(2.into()));
    assert_eq!(p["addresses"][0], yaml_str("192.0.2.10/24"));
    assert_eq!(p["routes"][0]["via"], yaml_str("192.0.2.1"));
    assert_eq!(p["routes"][0]["to"], yaml_str("0.0.0.0/0"));
    assert_eq!(p["nameservers"]["addresses"][0], yaml_str("192.0.2.53"));
    let dhcp: Value = serde_yaml::from_str(&render_network(&Network::Dhcp).unwrap()).unwrap();
    assert_eq!(dhcp["ethernets"]["eth0"]["dhcp4"], Value::Bool(true));
    assert!(
        dhcp["ethernets"]["eth0"].get("match").is_none(),
        "the eni renderer cannot express match"
    );
}

#[test]
fn bad_inputs_are_input_errors() {
    let bad_net = StaticNet {
        address: "192.0.2.10".into(),
        gateway: None,
        dns: vec![],
    };
    assert_eq!(crate::error::exit_code(&bad_net.validate().unwrap_err()), 2);
    let mixed = StaticNet {
        address: "192.0.2.10/24".into(),
        gateway: Some("2001:db8::1".parse().unwrap()),
        dns: vec![],
    };
    assert!(mixed.validate().is_err());
    assert!(parse_ssh_keys("-----BEGIN OPENSSH PRIVATE KEY-----\nxx").is_err());
    assert!(parse_ssh_keys("# only a comment\n").is_err());
    assert_eq!(
        parse_ssh_keys(&format!("# c\n\n{KEY}\n")).unwrap(),
        vec![KEY.to_string()]
    );
    let mut a = agent();
    a.gitlab_url = "https://gitlab.example.com/api/v4".into();
    let e = validate_agent(&a).unwrap_err();
    assert_eq!(crate::error::exit_code(&e), 2);
    assert!(!e.to_string().contains("glrt-"));
    let mut a = agent();
    a.runner_token = Secret::new("glrt-x y");
    let e = validate_agent(&a).unwrap_err().to_string();
    assert!(e.contains("whitespace") && !e.contains("glrt"), "{e}");
}
