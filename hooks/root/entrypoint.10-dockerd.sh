# shellcheck shell=bash
# Boot hook (run as root, sourced): Docker-in-Docker. Starts dockerd in the background and
# waits until `docker info` answers before the runner registers, so no job can start against
# a daemon that is not up. The daemon is reaped while it runs and stopped (SIGTERM, then
# SIGKILL) after the runner on shutdown. Needs docker installed in the derived image and a
# container that may run it (--privileged, or sysbox):
#
#   RUN apt-get update && apt-get install -y docker.io && usermod -aG docker guest
#   COPY hooks/root/entrypoint.10-dockerd.sh /root/
#
# Variables: DOCKERD_WAIT_SEC (default 60), DOCKERD_ARGS (extra dockerd flags),
# DOCKERD_LOG (default /var/log/dockerd.log).
dockerd_wait="${DOCKERD_WAIT_SEC:-60}"
dockerd_log="${DOCKERD_LOG:-/var/log/dockerd.log}"
if docker info >/dev/null 2>&1; then
  echo "a Docker daemon already answers; not starting another"
else
  # shellcheck disable=SC2086
  dockerd ${DOCKERD_ARGS:-} >"$dockerd_log" 2>&1 &
  dockerd_pid=$!
  waited=0
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
      echo "dockerd exited; its log ($dockerd_log) ends with:" >&2
      tail -n 20 "$dockerd_log" >&2
      return 1
    fi
    if [ "$waited" -ge "$((dockerd_wait * 10))" ]; then
      echo "dockerd did not answer within ${dockerd_wait}s (DOCKERD_WAIT_SEC); its log is $dockerd_log" >&2
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "dockerd is up (pid $dockerd_pid) after $((waited / 10)).$((waited % 10))s"
  unset dockerd_pid waited
fi
unset dockerd_wait dockerd_log
