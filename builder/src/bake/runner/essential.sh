#!/bin/sh
# imagectl bake, essential stage (run inside the build root by mmdebstrap after the Essential
# packages and before the spec's packages): defer gitlab-runner's service setup.
#
# GitLab's package runs /usr/share/gitlab-runner/post-install from its postinst
# (gitlab-org/gitlab-runner: packaging/scripts/postinst.deb). That hook calls
# `gitlab-runner install`, which picks systemd only when /run/systemd/system exists or PID 1 is
# systemd (kardianos/service: service_systemd_linux.go isSystemd); in a build root neither holds,
# so it would write a SysV script with rc links (service_sysv_linux.go) and `start` it. It may
# also run before systemctl is unpacked. So the package's hook is diverted here and a stub takes
# its place; customize.sh puts it back and runs it once every package is installed.
# See docs/architecture.md, "gitlab-runner's package scripts in the bake".
set -eu
rm -f "$0"
hook=/usr/share/gitlab-runner/post-install
mkdir -p /usr/share/gitlab-runner
dpkg-divert --quiet --local --rename --divert "$hook.imagectl-deferred" --add "$hook"
cat >"$hook" <<'STUB'
#!/bin/sh
# imagectl bake: stands in for gitlab-runner's post-install until every package is installed.
echo "imagectl: deferring /usr/share/gitlab-runner/post-install to the end of the bake" >&2
exit 0
STUB
chmod 0755 "$hook"
