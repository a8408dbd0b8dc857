//! The container image, described twice: the `Dockerfile` (for the world) and
//! `hack/image.sh` (umoci, no daemon, for the local node). Both lay out the root
//! filesystem with `hack/image-rootfs.sh`, and `hack/image.sh` takes the user, workdir,
//! env, entrypoint and labels from the Dockerfile's final stage. These tests check that
//! the two agree (with an independent reading of the Dockerfile), that the declarations
//! agree with the rootfs, Cargo.toml and the chart, and that the rootfs built from this
//! test's own `keyward` holds the binary, exactly the libraries `ldd` lists, the users,
//! the CA bundle, and nothing else. No image is built and no cluster is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("keyward-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One Dockerfile instruction: its keyword (upper case), arguments, and stage index
/// (-1 before the first FROM).
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
    stage: i32,
}

/// The Dockerfile's instructions: comments and blank lines dropped, `\` continuations
/// joined.
fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending = String::new();
    let mut stage = -1;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(head) = line.trim_end().strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let full = full.trim();
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((full, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage += 1;
        }
        out.push(Instruction { keyword, args: args.trim().to_string(), stage });
    }
    assert!(pending.is_empty(), "the Dockerfile ends inside a continued line");
    out
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s)
}

/// `${NAME}` and `$NAME` from `args`.
fn expand(s: &str, args: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("unclosed ${");
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        out.push_str(args.get(name).unwrap_or_else(|| panic!("${name} is not an ARG of the final stage")));
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// `k="v" k2=v2` → pairs (values in double quotes may hold spaces).
fn pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, tail) = rest.split_once('=').unwrap_or_else(|| panic!("not key=value: {rest}"));
        let (value, tail) = if let Some(quoted) = tail.strip_prefix('"') {
            let end = quoted.find('"').expect("unclosed quote");
            (&quoted[..end], &quoted[end + 1..])
        } else {
            tail.split_once(char::is_whitespace).unwrap_or((tail, ""))
        };
        out.push((key.to_string(), value.to_string()));
        rest = tail.trim_start();
    }
    out
}

/// The Dockerfile, read the way Docker does for the subset it uses.
struct Dockerfile {
    instructions: Vec<Instruction>,
    /// The global ARGs (before the first FROM) and their defaults.
    global_args: BTreeMap<String, String>,
}

impl Dockerfile {
    fn load() -> Dockerfile {
        let instructions = instructions(&read("Dockerfile"));
        let global_args = instructions
            .iter()
            .filter(|i| i.stage == -1 && i.keyword == "ARG")
            .map(|i| match i.args.split_once('=') {
                Some((k, v)) => (k.to_string(), unquote(v).to_string()),
                None => (i.args.clone(), String::new()),
            })
            .collect();
        Dockerfile { instructions, global_args }
    }

    fn final_stage(&self) -> impl Iterator<Item = &Instruction> {
        let last = self.instructions.iter().map(|i| i.stage).max().unwrap();
        self.instructions.iter().filter(move |i| i.stage == last)
    }

    /// The image config the final stage declares, as the `umoci config` flags that
    /// `hack/image.sh --print-config` prints (and its build passes to umoci).
    fn config(&self, build_args: &[(&str, &str)]) -> Vec<String> {
        let mut args = BTreeMap::new();
        let mut out = Vec::new();
        for i in self.final_stage() {
            match i.keyword.as_str() {
                "FROM" | "COPY" => {}
                "ARG" => {
                    let (name, default) = match i.args.split_once('=') {
                        Some((k, v)) => (k.to_string(), unquote(v).to_string()),
                        None => (i.args.clone(), self.global_args.get(&i.args).cloned().unwrap_or_default()),
                    };
                    let value = build_args
                        .iter()
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| v.to_string())
                        .unwrap_or(default);
                    args.insert(name, value);
                }
                "USER" => out.push(format!("--config.user={}", expand(unquote(&i.args), &args))),
                "WORKDIR" => out.push(format!("--config.workingdir={}", expand(unquote(&i.args), &args))),
                "ENV" | "LABEL" => {
                    for (k, v) in pairs(&i.args) {
                        out.push(format!("--config.{}={k}={}", i.keyword.to_lowercase(), expand(&v, &args)));
                    }
                }
                "ENTRYPOINT" | "CMD" => {
                    let list: Vec<String> = serde_json::from_str(&i.args)
                        .unwrap_or_else(|e| panic!("{} must be a JSON array: {e}", i.keyword));
                    for a in list {
                        out.push(format!("--config.{}={a}", i.keyword.to_lowercase()));
                    }
                }
                other => panic!("{other} in the final stage: hack/image.sh cannot build it"),
            }
        }
        out
    }

    fn one(&self, keyword: &str) -> String {
        let found: Vec<_> = self.final_stage().filter(|i| i.keyword == keyword).collect();
        assert_eq!(found.len(), 1, "exactly one {keyword} in the final stage");
        found[0].args.clone()
    }

    fn entrypoint(&self) -> Vec<String> {
        serde_json::from_str(&self.one("ENTRYPOINT")).unwrap()
    }

    /// The final stage's USER as (uid, gid), both numeric.
    fn user(&self) -> (u32, u32) {
        let user = self.one("USER");
        let (uid, gid) = user.split_once(':').expect("USER uid:gid, so the gid is not left to /etc/passwd");
        (uid.parse().expect("a numeric UID"), gid.parse().expect("a numeric GID"))
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.config(&[])
            .iter()
            .filter_map(|l| l.strip_prefix("--config.label="))
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }
}

/// `hack/image.sh --print-config` with build args, and another Dockerfile if given.
fn image_sh_config(dockerfile: Option<&Path>, build_args: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new("bash");
    cmd.arg(repo("hack/image.sh")).arg("--print-config");
    for (k, v) in build_args {
        cmd.arg("--build-arg").arg(format!("{k}={v}"));
    }
    if let Some(d) = dockerfile {
        cmd.env("KEYWARD_DOCKERFILE", d);
    } else {
        cmd.env_remove("KEYWARD_DOCKERFILE");
    }
    let out = cmd.output().expect("bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `NAME=value` assignments at the start of a line of hack/image-rootfs.sh.
fn rootfs_script_var(name: &str) -> String {
    read("hack/image-rootfs.sh")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("hack/image-rootfs.sh sets no {name}"))
        .to_string()
}

const BUILD_ARGS: &[(&str, &str)] = &[("REVISION", "0123456789abcdef0123456789abcdef01234567")];

#[test]
fn image_sh_builds_the_config_the_dockerfile_declares() {
    let dockerfile = Dockerfile::load();
    let expected = dockerfile.config(BUILD_ARGS);
    let (ok, stdout, stderr) = image_sh_config(None, BUILD_ARGS);
    assert!(ok, "hack/image.sh --print-config failed: {stderr}");
    let got: Vec<&str> = stdout.lines().collect();
    assert_eq!(got, expected, "hack/image.sh reads the Dockerfile's final stage differently");
    for kind in [
        "--config.user=",
        "--config.workingdir=",
        "--config.entrypoint=",
        "--config.label=org.opencontainers.image.revision=0123",
    ] {
        assert!(got.iter().any(|l| l.starts_with(kind)), "no `{kind}` in {got:?}");
    }

    // The build steps: the same cargo command and the same rootfs script in both.
    let build: Vec<_> =
        dockerfile.instructions.iter().filter(|i| i.stage == 0 && i.keyword == "RUN").collect();
    let run = build.iter().map(|i| i.args.as_str()).collect::<Vec<_>>().join("\n");
    let cargo = "cargo build --release --locked --bin keyward";
    assert!(run.contains(cargo), "the Dockerfile's build stage runs `{cargo}`");
    assert!(
        run.contains("hack/image-rootfs.sh target/release/keyward /rootfs"),
        "the Dockerfile's build stage lays out /rootfs with hack/image-rootfs.sh"
    );
    let finals: Vec<_> = dockerfile.final_stage().collect();
    assert_eq!(finals[0].args, "scratch", "the final stage is FROM scratch");
    let copies: Vec<_> = finals.iter().filter(|i| i.keyword == "COPY").map(|i| i.args.as_str()).collect();
    assert_eq!(copies, ["--from=build /rootfs /"], "the final stage copies the rootfs and nothing else");
    let script = read("hack/image.sh");
    assert!(script.contains(cargo), "hack/image.sh runs `{cargo}`");
    assert!(script.contains("hack/image-rootfs.sh \"$bin\""), "hack/image.sh lays out the rootfs");
}

#[test]
fn image_sh_follows_the_dockerfile_and_refuses_what_it_cannot_build() {
    let dir = TempDir::new("dockerfile");
    let original = read("Dockerfile");
    let user = format!("USER {}", Dockerfile::load().one("USER"));
    assert!(original.contains(&user));

    // Another USER and ENTRYPOINT in the Dockerfile: hack/image.sh follows.
    let changed = dir.0.join("Dockerfile.changed");
    let text = original.replace(&user, "USER 1000:1000").replace(
        "ENTRYPOINT [\"/usr/local/bin/keyward\"]",
        "ENTRYPOINT [\"/usr/local/bin/keyward\", \"controller\"]\nCMD [\"--help\"]",
    );
    std::fs::write(&changed, text).unwrap();
    let (ok, stdout, stderr) = image_sh_config(Some(&changed), BUILD_ARGS);
    assert!(ok, "{stderr}");
    assert!(stdout.lines().any(|l| l == "--config.user=1000:1000"), "{stdout}");
    let entry: Vec<_> = stdout
        .lines()
        .filter(|l| l.starts_with("--config.entrypoint=") || l.starts_with("--config.cmd="))
        .collect();
    assert_eq!(
        entry,
        [
            "--config.entrypoint=/usr/local/bin/keyward",
            "--config.entrypoint=controller",
            "--config.cmd=--help"
        ]
    );

    // Build args reach the labels.
    let (ok, stdout, _) = image_sh_config(None, &[("VERSION", "9.9.9"), ("REVISION", "abc")]);
    assert!(ok);
    assert!(stdout.lines().any(|l| l == "--config.label=org.opencontainers.image.version=9.9.9"), "{stdout}");

    // What it cannot reproduce, it refuses.
    for (what, bad) in [
        ("a RUN in the final stage", original.replace(&user, &format!("RUN true\n{user}"))),
        ("another base", original.replace("FROM scratch", "FROM debian:bookworm-slim")),
        ("another COPY", original.replace(&user, &format!("COPY README.md /\n{user}"))),
        ("shell-form ENTRYPOINT", original.replace("[\"/usr/local/bin/keyward\"]", "/usr/local/bin/keyward")),
    ] {
        let path = dir.0.join("Dockerfile.bad");
        assert_ne!(bad, original, "{what}: the replacement did not apply");
        std::fs::write(&path, bad).unwrap();
        let (ok, stdout, stderr) = image_sh_config(Some(&path), BUILD_ARGS);
        assert!(!ok, "hack/image.sh accepted {what}: {stdout}");
        assert!(stderr.contains("error"), "{what}: {stderr}");
    }
}

#[test]
fn dockerfile_agrees_with_the_rootfs_cargo_and_the_chart() {
    let dockerfile = Dockerfile::load();

    // The user: the Dockerfile's USER, the rootfs's nonroot user, the chart's pods.
    let (uid, gid) = dockerfile.user();
    assert_ne!(uid, 0, "the image runs as a non-root user");
    assert_eq!(rootfs_script_var("NONROOT_UID"), uid.to_string(), "hack/image-rootfs.sh's user");
    assert_eq!(rootfs_script_var("NONROOT_GID"), gid.to_string(), "hack/image-rootfs.sh's group");
    let helpers = read("charts/keyward/templates/_helpers.tpl");
    for (key, id) in [("runAsUser", uid), ("runAsGroup", gid)] {
        let values: BTreeSet<&str> = helpers
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}:")))
            .map(str::trim)
            .collect();
        assert_eq!(values, BTreeSet::from([id.to_string().as_str()]), "the chart's {key}");
    }

    // The entrypoint: the binary the rootfs installs.
    let entrypoint = dockerfile.entrypoint();
    assert_eq!(entrypoint, [rootfs_script_var("BIN_PATH")], "ENTRYPOINT is the binary alone");
    let env: BTreeMap<String, String> = dockerfile
        .config(&[])
        .iter()
        .filter_map(|l| l.strip_prefix("--config.env="))
        .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap())
        .collect();
    let path = env.get("PATH").expect("ENV PATH (scratch has none; Docker would add its own)");
    let bin_dir = Path::new(&entrypoint[0]).parent().unwrap().to_str().unwrap();
    assert!(path.split(':').any(|p| p == bin_dir), "PATH {path} holds {bin_dir}");
    assert_eq!(env.get("SSL_CERT_FILE"), Some(&rootfs_script_var("CA_BUNDLE")));

    // The version: Cargo.toml's, and the chart's appVersion (its default image tag).
    assert_eq!(dockerfile.global_args.get("VERSION").map(String::as_str), Some(env!("CARGO_PKG_VERSION")));
    let chart: serde_yaml::Value = serde_yaml::from_str(&read("charts/keyward/Chart.yaml")).unwrap();
    assert_eq!(chart["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")), "Chart.yaml appVersion");

    // The OCI labels.
    let labels = dockerfile.labels();
    let label = |k: &str| labels.get(&format!("org.opencontainers.image.{k}")).map(String::as_str);
    assert_eq!(label("title"), Some(env!("CARGO_PKG_NAME")));
    assert_eq!(label("description"), Some(env!("CARGO_PKG_DESCRIPTION")));
    assert_eq!(label("licenses"), Some(env!("CARGO_PKG_LICENSE")));
    assert_eq!(label("version"), Some(env!("CARGO_PKG_VERSION")));
    assert!(label("source").is_some_and(|s| s.starts_with("https://")), "{labels:?}");
    assert!(label("revision").is_some(), "{labels:?}");

    // The build context keeps what the build needs.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_start_matches("**/").to_string())
        .collect();
    for needed in ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs", "hack/image-rootfs.sh"] {
        for pattern in &ignored {
            let hit = pattern == "*"
                || needed == pattern
                || needed.starts_with(&format!("{pattern}/"))
                || needed.split('/').any(|part| part == pattern);
            assert!(!hit, ".dockerignore's {pattern} leaves {needed} out of the build");
        }
    }
}

/// Every entry under `root`, relative, with its metadata.
fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, std::fs::Metadata>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.path().symlink_metadata().unwrap();
        let rel = entry.path().strip_prefix(root).unwrap().to_str().unwrap().to_string();
        if meta.is_dir() {
            walk(root, &entry.path(), out);
        }
        out.insert(format!("/{rel}"), meta);
    }
}

/// The files `ldd` says `bin` needs: `name => /path (addr)` and the loader's `/path (addr)`.
fn ldd(bin: &str) -> (Vec<String>, Option<String>) {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    let mut loader = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [_, "=>", path, _] if path.starts_with('/') => libs.push(path.to_string()),
            [path, _] if path.starts_with('/') => {
                libs.push(path.to_string());
                loader = Some(path.to_string());
            }
            _ => {}
        }
    }
    (libs, loader)
}

#[test]
fn rootfs_holds_the_binary_its_libraries_and_nothing_else() {
    let bin = env!("CARGO_BIN_EXE_keyward");
    let dir = TempDir::new("rootfs");
    let root = dir.0.join("rootfs");
    let epoch = 1_700_000_000i64;
    let out = Command::new("bash")
        .arg(repo("hack/image-rootfs.sh"))
        .arg(bin)
        .arg(&root)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .output()
        .expect("bash");
    assert!(out.status.success(), "hack/image-rootfs.sh: {}", String::from_utf8_lossy(&out.stderr));

    let dockerfile = Dockerfile::load();
    let entry = dockerfile.entrypoint().remove(0);
    let (libs, loader) = ldd(bin);
    assert!(libs.iter().any(|l| l.contains("/libc.so")), "ldd lists libc: {libs:?}");
    let loader = loader.expect("ldd names the dynamic loader");

    // Exactly these files, and their directories.
    let files: BTreeSet<String> = [
        entry.clone(),
        "/etc/passwd".into(),
        "/etc/group".into(),
        "/etc/nsswitch.conf".into(),
        "/etc/ssl/certs/ca-certificates.crt".into(),
    ]
    .into_iter()
    .chain(libs.iter().cloned())
    .collect();
    let mut expected: BTreeSet<String> = BTreeSet::from(["/tmp".to_string()]);
    for f in &files {
        let mut p = Path::new(f);
        expected.insert(f.clone());
        while let Some(parent) = p.parent().filter(|p| *p != Path::new("/")) {
            expected.insert(parent.to_str().unwrap().to_string());
            p = parent;
        }
    }
    let mut found = BTreeMap::new();
    walk(&root, &root, &mut found);
    let names: BTreeSet<String> = found.keys().cloned().collect();
    assert_eq!(names, expected, "the rootfs holds exactly the binary, its libraries, users and CA bundle");

    for (name, meta) in &found {
        assert!(!meta.file_type().is_symlink(), "{name} is a symlink");
        assert_eq!(meta.mtime(), epoch, "{name}'s mtime is SOURCE_DATE_EPOCH");
        let mode = meta.permissions().mode() & 0o7777;
        let want = match name.as_str() {
            "/tmp" => 0o1777,
            _ if meta.is_dir() => 0o755,
            n if *n == entry || libs.contains(&n.to_string()) => 0o755,
            _ => 0o644,
        };
        assert_eq!(mode, want, "{name}'s mode is {mode:o}");
    }

    // The user the Dockerfile runs as exists, with its group.
    let (uid, gid) = dockerfile.user();
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user: Vec<&str> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[2] == uid.to_string())
        .unwrap_or_else(|| panic!("no UID {uid} in /etc/passwd:\n{passwd}"))
        .clone();
    assert_eq!(user[3], gid.to_string(), "{user:?}");
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.split(':').nth(2) == Some(&gid.to_string())), "{group}");
    assert_eq!(
        std::fs::read(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap(),
        std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap()
    );

    // The binary runs on the rootfs's own loader and libraries.
    let lib_dirs: BTreeSet<String> = libs
        .iter()
        .map(|l| {
            root.join(&Path::new(l).parent().unwrap().to_str().unwrap()[1..]).to_str().unwrap().to_string()
        })
        .collect();
    let out = Command::new(root.join(&loader[1..]))
        .arg("--inhibit-cache")
        .arg("--library-path")
        .arg(lib_dirs.into_iter().collect::<Vec<_>>().join(":"))
        .arg(root.join(&entry[1..]))
        .arg("--version")
        .output()
        .expect("the rootfs's loader");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), format!("keyward {}", env!("CARGO_PKG_VERSION")));

    // It refuses to write over a directory that is not empty.
    let out = Command::new("bash").arg(repo("hack/image-rootfs.sh")).arg(bin).arg(&root).output().unwrap();
    assert!(!out.status.success(), "hack/image-rootfs.sh wrote over a non-empty rootfs");
}
