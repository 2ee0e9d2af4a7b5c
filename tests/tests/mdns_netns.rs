//! mDNS discovery for real, inside network namespaces this test creates: three nodes on
//! a bridge (in its own namespace), no static peers. The two of one mesh find each other
//! and sync; the node of another mesh on the same bridge is ignored.
//!
//! Needs root and iproute2 (`.ci/run` installs it). mDNS never runs outside the
//! namespaces made here.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use medmesh_tests::medmesh_bin;

struct Namespaces {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {} failed", args.join(" "));
}

fn in_ns(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(medmesh_bin())
        .args(args)
        .env("MEDMESH_TOKEN", medmesh_tests::TEST_TOKEN)
        .output()
        .expect("run medmesh in a namespace");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn wait(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn node_id(init_output: &str) -> String {
    init_output
        .lines()
        .find_map(|l| l.strip_prefix("Node id: "))
        .expect("init prints the node id")
        .trim()
        .to_owned()
}

#[test]
fn nodes_find_each_other_by_mdns_and_ignore_another_mesh() {
    let ip_ok = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ip_ok,
        "this test needs iproute2 (`apt-get install -y iproute2`; .ci/run does it)"
    );
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "this test creates network namespaces and needs root");

    let tag = format!("mm{}", std::process::id());
    let bridge = format!("{tag}-br");
    let mut guard = Namespaces {
        names: Vec::new(),
        children: Vec::new(),
    };
    ip(&["netns", "add", &bridge]);
    guard.names.push(bridge.clone());
    ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
    ip(&[
        "-n",
        &bridge,
        "link",
        "set",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ]);
    ip(&["-n", &bridge, "link", "set", "lo", "up"]);
    ip(&["-n", &bridge, "link", "set", "br0", "up"]);
    let nodes: Vec<String> = (1..=3).map(|i| format!("{tag}-n{i}")).collect();
    for (i, ns) in nodes.iter().enumerate() {
        let veth = format!("veth{}", i + 1);
        ip(&["netns", "add", ns]);
        guard.names.push(ns.clone());
        ip(&[
            "-n", &bridge, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ]);
        ip(&[
            "-n",
            &bridge,
            "link",
            "set",
            &veth,
            "master",
            "br0",
            "multicast",
            "on",
            "up",
        ]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.77.0.{}/24", i + 1),
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "multicast", "on", "up"]);
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let data: Vec<String> = (1..=3)
        .map(|i| dir.path().join(format!("n{i}")).display().to_string())
        .collect();
    let run = |args: &[&str]| {
        let out = medmesh_tests::medmesh_command()
            .args(args)
            .output()
            .expect("medmesh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let id1 = node_id(&run(&["init", "--data", &data[0]]));
    let id3 = node_id(&run(&["init", "--data", &data[2]]));
    let start = |ns: &str, data: &str| {
        medmesh_tests::give_test_token(std::path::Path::new(data)).expect("token");
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(medmesh_bin())
            .args([
                "start",
                "--data",
                data,
                "--api",
                "127.0.0.1:7400",
                "--listen",
                "/ip4/0.0.0.0/tcp/7401",
                "--mdns-interface",
                "eth0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a node in its namespace")
    };
    // The admin node runs; the invite names its LAN address; the new device, in its own
    // namespace, is admitted over the LAN.
    guard.children.push(start(&nodes[0], &data[0]));
    wait("the first node's API", Duration::from_secs(30), || {
        in_ns(&nodes[0], &["status", "--api", "127.0.0.1:7400"]).0
    });
    let invite = run(&["invite", "--data", &data[0]])
        .lines()
        .last()
        .expect("invite")
        .to_owned();
    let (joined, out) = in_ns(&nodes[1], &["init", "--data", &data[1], "--join", &invite]);
    assert!(joined, "joined over the LAN: {out}");
    let id2 = node_id(&out);
    guard.children.push(start(&nodes[1], &data[1]));
    guard.children.push(start(&nodes[2], &data[2]));
    for ns in &nodes {
        wait("the node's API", Duration::from_secs(30), || {
            in_ns(ns, &["status", "--api", "127.0.0.1:7400"]).0
        });
    }
    // The invite left node 1's address with node 2; forget it, so that only mDNS can
    // bring them together again.
    let (forgot, out) = in_ns(
        &nodes[1],
        &["peers", "forget", &id1, "--api", "127.0.0.1:7400"],
    );
    assert!(forgot, "forget the invite's address: {out}");
    let (ok, _) = in_ns(
        &nodes[0],
        &[
            "put",
            "patients",
            r#"{"given_name": "Found by mDNS"}"#,
            "--api",
            "127.0.0.1:7400",
        ],
    );
    assert!(ok);
    let (ok, _) = in_ns(
        &nodes[2],
        &[
            "put",
            "patients",
            r#"{"given_name": "Other mesh"}"#,
            "--api",
            "127.0.0.1:7400",
        ],
    );
    assert!(ok);
    wait(
        "node 2 to receive node 1's record with no static peers",
        Duration::from_secs(40),
        || {
            in_ns(&nodes[1], &["list", "patients", "--api", "127.0.0.1:7400"])
                .1
                .contains("Found by mDNS")
        },
    );
    let (_, peers1) = in_ns(&nodes[0], &["peers", "--api", "127.0.0.1:7400"]);
    assert!(peers1.contains(&id2), "node 1 lists node 2: {peers1}");
    assert!(
        !peers1.contains(&id3),
        "node 1 ignores the other mesh's node: {peers1}"
    );
    let (_, peers3) = in_ns(&nodes[2], &["peers", "--api", "127.0.0.1:7400"]);
    assert!(
        !peers3.contains(&id1) && !peers3.contains(&id2),
        "the other mesh's node sees nobody: {peers3}"
    );
    let (_, list1) = in_ns(&nodes[0], &["list", "patients", "--api", "127.0.0.1:7400"]);
    assert!(
        !list1.contains("Other mesh"),
        "nothing came from the other mesh"
    );
    let (_, list3) = in_ns(&nodes[2], &["list", "patients", "--api", "127.0.0.1:7400"]);
    assert!(
        !list3.contains("Found by mDNS"),
        "nothing went to the other mesh"
    );
}
