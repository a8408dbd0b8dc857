//! One error type for keyward. Messages never contain key material.

/// Everything that can go wrong, with the cause chained as `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a call.
    #[error("Kubernetes API: {context}")]
    Kube {
        /// What keyward was doing.
        context: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// No usable cluster configuration (in-cluster, KUBECONFIG, --kubeconfig).
    #[error("no cluster configuration: {0}")]
    Config(String),
    /// keyward's CRDs are not installed on the cluster.
    #[error(
        "the {kind} CRD ({plural}.keyward.dev/v1alpha1) is not installed on {server}; \
         install it with `keyward crds | kubectl apply -f -` (or the Helm chart)"
    )]
    CrdMissing {
        /// Kind that is missing.
        kind: &'static str,
        /// Its plural resource name.
        plural: &'static str,
        /// The API server asked.
        server: String,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// CRD YAML could not be rendered.
    #[error("cannot render CRDs")]
    Yaml(#[from] serde_yaml::Error),
    /// A spec field is invalid (message names the field and the expected form).
    #[error("{0}")]
    InvalidSpec(String),
}

impl Error {
    /// Wrap a kube error with what was being done.
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let context = context.into();
        move |source| Error::Kube { context, source }
    }

    /// Short label for metrics (`reason` label of failure counters).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Config(_) => "config",
            Error::CrdMissing { .. } => "crd_missing",
            Error::Listen { .. } => "listen",
            Error::Yaml(_) => "yaml",
            Error::InvalidSpec(_) => "invalid_spec",
        }
    }
}

/// The error and all its causes on one line: `a: b: c`.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Result with keyward's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
