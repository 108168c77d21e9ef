//! The Docker engine, through its API on the local socket (bollard): runner containers are
//! created, given their JIT configuration, started, listed by label and removed.
//!
//! The JIT configuration is uploaded into the created container as
//! `/run/secrets/RUNNER_JITCONFIG` (root, 0400) before it starts, where the supervisor reads
//! it as it reads every secret file: it is then in neither `docker inspect`'s environment nor
//! any process's argv, and the job (run as `guest`) cannot read it.
//!
//! An image that is not on the host is pulled, as `docker run` would: at the pool's start, so
//! the first job does not wait for it, and again when a create finds it missing.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::{ContainerCreateBody, ContainerSummaryStateEnum, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, ListContainersOptions, RemoveContainerOptions,
    StartContainerOptions, UploadToContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;

use super::pool::Observed;
use crate::config::Secret;

/// The labels every runner container carries: the controller finds its own by them.
pub const LABEL_CONTROLLER: &str = "ci-runner.controller";
pub const LABEL_POOL: &str = "ci-runner.controller.pool";
pub const LABEL_JOB: &str = "ci-runner.controller.job";
pub const LABEL_RUNNER_ID: &str = "ci-runner.controller.runner-id";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("connect to the Docker engine at {path}")]
    Connect {
        path: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("{what} container {name}")]
    Api {
        what: &'static str,
        name: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("list the containers of pool {pool}")]
    List {
        pool: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("read the Docker engine's system information")]
    Info {
        #[source]
        source: bollard::errors::Error,
    },
    #[error("pull image {image}")]
    Pull {
        image: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("pack the JIT configuration for container {name}")]
    Pack {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a runner container is made of.
pub struct RunnerSpec<'a> {
    pub name: &'a str,
    pub pool: &'a str,
    pub image: &'a str,
    pub env: Vec<String>,
    pub network: Option<&'a str>,
    pub binds: &'a [String],
    pub for_job: Option<u64>,
    pub runner_id: u64,
    pub jit: &'a Secret,
}

#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    /// `CONTROLLER_NAME`, on every container it starts.
    controller: String,
}

impl Engine {
    pub fn connect(socket: &Path, controller: &str) -> Result<Self, EngineError> {
        let path = socket.display().to_string();
        let docker = Docker::connect_with_socket(&path, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|source| EngineError::Connect { path: path.clone(), source })?;
        Ok(Self { docker, controller: controller.to_string() })
    }

    /// Agrees on the API version with the engine (older engines answer only up to theirs),
    /// at start, so that a wrong socket fails the start.
    pub async fn negotiate(self, socket: &Path) -> Result<Self, EngineError> {
        let err = |source| EngineError::Connect { path: socket.display().to_string(), source };
        let docker = self.docker.negotiate_version().await.map_err(err)?;
        docker.ping().await.map_err(err)?;
        Ok(Self { docker, controller: self.controller })
    }

    /// The engine host's architecture (`docker info`'s `Architecture`, e.g. `x86_64`): where
    /// the runner containers run, which may not be where the controller runs.
    pub async fn architecture(&self) -> Result<String, EngineError> {
        let info = self.docker.info().await.map_err(|source| EngineError::Info { source })?;
        Ok(info.architecture.unwrap_or_default())
    }

    /// Create, upload the JIT configuration, start. A container that fails to start is removed.
    pub async fn start(&self, spec: &RunnerSpec<'_>) -> Result<String, EngineError> {
        let api = |what: &'static str| {
            let name = spec.name.to_string();
            move |source| EngineError::Api { what, name, source }
        };
        let mut labels = HashMap::from([
            (LABEL_CONTROLLER.to_string(), self.controller.clone()),
            (LABEL_POOL.to_string(), spec.pool.to_string()),
            (LABEL_RUNNER_ID.to_string(), spec.runner_id.to_string()),
        ]);
        if let Some(job) = spec.for_job {
            labels.insert(LABEL_JOB.to_string(), job.to_string());
        }
        let body = ContainerCreateBody {
            image: Some(spec.image.to_string()),
            env: Some(spec.env.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: spec.network.map(str::to_string),
                binds: (!spec.binds.is_empty()).then(|| spec.binds.to_vec()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(spec.name.to_string()), ..Default::default() };
        let created = match self.docker.create_container(Some(options.clone()), body.clone()).await {
            Err(e) if is_not_found(&e) => {
                self.pull(spec.image).await?;
                self.docker.create_container(Some(options), body).await
            }
            created => created,
        }
        .map_err(api("create"))?;
        let result = async {
            let tar = jit_archive(spec.jit).map_err(|source| EngineError::Pack { name: spec.name.into(), source })?;
            let upload = UploadToContainerOptions { path: "/run".into(), ..Default::default() };
            self.docker
                .upload_to_container(&created.id, Some(upload), bollard::body_full(tar.into()))
                .await
                .map_err(api("upload the JIT configuration into"))?;
            self.docker.start_container(&created.id, None::<StartContainerOptions>).await.map_err(api("start"))
        }
        .await;
        if let Err(e) = result {
            let _ = self.remove(spec.name).await;
            return Err(e);
        }
        Ok(created.id)
    }

    /// Pulls `image` unless the host has it; true when it was pulled.
    pub async fn ensure_image(&self, image: &str) -> Result<bool, EngineError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(false),
            Err(e) if is_not_found(&e) => self.pull(image).await.map(|()| true),
            Err(source) => Err(EngineError::Pull { image: image.into(), source }),
        }
    }

    /// Pulls `image` (with no credentials: a private image must be pulled on the host first).
    /// The engine joins a pull of the same image already under way.
    pub async fn pull(&self, image: &str) -> Result<(), EngineError> {
        let options = CreateImageOptions { from_image: Some(pull_reference(image)), ..Default::default() };
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            step.map_err(|source| EngineError::Pull { image: image.into(), source })?;
        }
        Ok(())
    }

    /// Every container of `pool`, running or not.
    pub async fn list(&self, pool: &str) -> Result<Vec<Observed>, EngineError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_CONTROLLER}={}", self.controller), format!("{LABEL_POOL}={pool}")],
        )]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|source| EngineError::List { pool: pool.into(), source })?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let name = c.names?.first()?.trim_start_matches('/').to_string();
                let labels = c.labels.unwrap_or_default();
                let running = matches!(
                    c.state,
                    Some(
                        ContainerSummaryStateEnum::RUNNING
                            | ContainerSummaryStateEnum::CREATED
                            | ContainerSummaryStateEnum::RESTARTING
                            | ContainerSummaryStateEnum::PAUSED
                    )
                );
                Some(Observed {
                    name,
                    for_job: labels.get(LABEL_JOB).and_then(|v| v.parse().ok()),
                    runner_id: labels.get(LABEL_RUNNER_ID).and_then(|v| v.parse().ok()),
                    running,
                    age: Duration::from_secs(now.saturating_sub(c.created.unwrap_or(now)).max(0) as u64),
                })
            })
            .collect())
    }

    /// SIGTERM to container `name`'s PID 1, the supervisor, which drains: a running job
    /// finishes, the runner de-registers, the container exits. The pool waits for the exit
    /// (and kills past its grace), not this call: `docker stop`'s wait would outlast the API
    /// client's timeout. Gone already, or no longer running, is fine.
    pub async fn stop(&self, name: &str) -> Result<(), EngineError> {
        let options = KillContainerOptions { signal: "SIGTERM".into() };
        match self.docker.kill_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) || is_not_running(&e) => Ok(()),
            Err(source) => Err(EngineError::Api { what: "stop", name: name.into(), source }),
        }
    }

    /// Removes container `name`; gone already is fine. Force: the pool removes only exited
    /// containers, except one whose drain overran the grace period (then this is the kill of
    /// `docker stop`).
    pub async fn remove(&self, name: &str) -> Result<(), EngineError> {
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(EngineError::Api { what: "remove", name: name.into(), source }),
        }
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

/// The engine's 409 to a kill: "container … is not running".
fn is_not_running(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 409, .. })
}

/// `image` as the engine's pull wants it: with a tag, `latest` when it names none (a pull
/// without one would fetch every tag of the repository). A digest is kept as it is.
fn pull_reference(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// A tar of `secrets/RUNNER_JITCONFIG` (root, 0400) for the upload into `/run`.
fn jit_archive(jit: &Secret) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_mtime(0);
    dir.set_cksum();
    b.append_data(&mut dir, "secrets/", std::io::empty())?;
    let data = jit.expose().as_bytes();
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o400);
    file.set_size(data.len() as u64);
    file.set_uid(0);
    file.set_gid(0);
    file.set_mtime(0);
    file.set_cksum();
    b.append_data(&mut file, "secrets/RUNNER_JITCONFIG", data)?;
    b.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_names_a_tag_and_keeps_a_given_one_or_a_digest() {
        for (image, pulled) in [
            ("ci-runner", "ci-runner:latest"),
            ("ghcr.io/acme/ci-runner", "ghcr.io/acme/ci-runner:latest"),
            ("127.0.0.1:5000/ci-runner", "127.0.0.1:5000/ci-runner:latest"),
            ("127.0.0.1:5000/ci-runner:v2", "127.0.0.1:5000/ci-runner:v2"),
            ("ghcr.io/acme/ci-runner@sha256:abcd", "ghcr.io/acme/ci-runner@sha256:abcd"),
        ] {
            assert_eq!(pull_reference(image), pulled, "{image}");
        }
    }

    #[test]
    fn the_jit_archive_holds_one_root_only_file() {
        let tar = jit_archive(&Secret::new("abc")).unwrap();
        let mut a = tar::Archive::new(tar.as_slice());
        let entries: Vec<(String, u32, u64)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().mode().unwrap(), e.header().uid().unwrap())
            })
            .collect();
        assert_eq!(entries, [("secrets/".into(), 0o755, 0), ("secrets/RUNNER_JITCONFIG".into(), 0o400, 0)]);
    }
}
