# shellcheck shell=bash
# Boot hook (run as root, sourced): let the runner user use a Docker socket mounted from the
# host (`-v /var/run/docker.sock:/var/run/docker.sock`). The socket's group id on the host
# rarely matches the image's `docker` group, so align them: a group with the socket's gid gets
# the runner user as a member. Enable by copying into a derived image:
#
#   COPY hooks/root/entrypoint.05-docker-group.sh /root/
#
# Variables: DOCKER_SOCKET (default /var/run/docker.sock), RUNNER_USER (default guest).
docker_socket="${DOCKER_SOCKET:-/var/run/docker.sock}"
runner_user="${RUNNER_USER:-guest}"
if [ -S "$docker_socket" ]; then
  socket_gid="$(stat -c %g "$docker_socket")"
  if [ "$socket_gid" = 0 ]; then
    echo "$docker_socket belongs to group root; not adding $runner_user to root's group"
  else
    group="$(getent group "$socket_gid" | cut -d: -f1)"
    if [ -z "$group" ]; then
      if getent group docker >/dev/null; then
        groupmod -g "$socket_gid" docker
        group=docker
      else
        groupadd -g "$socket_gid" docker-host
        group=docker-host
      fi
    fi
    usermod -aG "$group" "$runner_user"
    echo "$runner_user is in group $group (gid $socket_gid) for $docker_socket"
  fi
  unset socket_gid group
else
  echo "no Docker socket at $docker_socket; nothing to align"
fi
unset docker_socket runner_user
