#!/bin/sh
# imagectl bake, customize stage (run inside the build root by mmdebstrap once every package is
# installed): run gitlab-runner's deferred post-install as on the booted image, keep its unit
# disabled, and check that no SysV script is active and nothing was started. Any violation fails
# the bake with a line starting "E: imagectl: gitlab-runner:".
# See essential.sh and docs/architecture.md, "gitlab-runner's package scripts in the bake".
set -eu
rm -f "$0"
hook=/usr/share/gitlab-runner/post-install
unit=gitlab-runner.service
fail() {
    echo "E: imagectl: gitlab-runner: $*" >&2
    exit 1
}

# 1. Undo the diversion: the package's own post-install (if any) returns to its path.
deferred=
if [ "$(dpkg-divert --truename "$hook")" != "$hook" ]; then
    rm -f "$hook"
    dpkg-divert --quiet --local --rename --remove "$hook"
    deferred=1
fi
rmdir /usr/share/gitlab-runner 2>/dev/null || :
if [ -f /var/lib/dpkg/diversions-old ] && grep -q imagectl-deferred /var/lib/dpkg/diversions-old; then
    # dpkg-divert's backup would keep naming the bake's diversion.
    cp -p /var/lib/dpkg/diversions /var/lib/dpkg/diversions-old
fi
if [ "$(dpkg-query -W -f='${db:Status-Status}' gitlab-runner 2>/dev/null || :)" != installed ]; then
    exit 0
fi
[ -x "$hook" ] || fail "the installed package has no $hook any more; imagectl defers that hook \
(builder/src/bake/runner/) and must learn the package's new layout"
command -v systemctl >/dev/null 2>&1 ||
    fail "systemctl is not installed: the image needs systemd (add systemd-sysv to packages)"

# 2. Run it as it would run on the booted image: /run/systemd/system makes `gitlab-runner install`
#    choose systemd (kardianos/service isSystemd) and write /etc/systemd/system/gitlab-runner.service;
#    SYSTEMD_OFFLINE=1 keeps systemctl from talking to a service manager (systemd
#    docs/ENVIRONMENT.md), so its `start` is a no-op; NO_DOCKER_PRUNE skips the postinst's
#    docker prune (packaging/scripts/postinst.deb). mmdebstrap's policy-rc.d (exit 101) and
#    fake start-stop-daemon stay in place meanwhile. Without the diversion (the essential hook
#    did not run) the post-install already ran under apt: the checks below judge what it left.
if [ -n "$deferred" ]; then
    made=
    if [ ! -e /run/systemd/system ]; then
        mkdir -p /run/systemd/system
        made=1
    fi
    rc=0
    SYSTEMD_OFFLINE=1 NO_DOCKER_PRUNE=1 "$hook" || rc=$?
    if [ -n "$made" ]; then
        rmdir /run/systemd/system
        rmdir /run/systemd 2>/dev/null || :
    fi
    [ "$rc" -eq 0 ] || fail "$hook failed (exit status $rc); its output is above"
else
    echo "imagectl: gitlab-runner: its post-install was not deferred; checking what it left" >&2
fi

# 3. `install` enabled the unit; imagectl-agent enables and starts it once config.toml exists.
SYSTEMD_OFFLINE=1 systemctl --quiet disable "$unit" || :

# 4. Checks.
if [ -e /etc/init.d/gitlab-runner ] || [ -L /etc/init.d/gitlab-runner ]; then
    fail "a SysV init script /etc/init.d/gitlab-runner was written; only the systemd unit may exist"
fi
for l in /etc/rc[0-6S].d/[SK]*gitlab-runner; do
    if [ -e "$l" ] || [ -L "$l" ]; then
        fail "SysV link $l exists; gitlab-runner must not be started by init scripts"
    fi
done
[ ! -e /etc/init/gitlab-runner.conf ] || fail "an upstart job /etc/init/gitlab-runner.conf was written"
found=
for d in /etc/systemd/system /lib/systemd/system /usr/lib/systemd/system; do
    if [ -f "$d/$unit" ]; then
        found=$d/$unit
        break
    fi
done
[ -n "$found" ] || fail "no $unit after the package's post-install; imagectl-agent could not start gitlab-runner"
links=$(find /etc/systemd/system \( -path "*.wants/$unit" -o -path "*.requires/$unit" \) 2>/dev/null)
[ -z "$links" ] || fail "$unit is still enabled: $links"
for f in /run/gitlab-runner.pid /var/run/gitlab-runner.pid; do
    [ ! -e "$f" ] || fail "$f exists: gitlab-runner was started during the bake"
done
for p in /proc/[0-9]*; do
    # Only processes inside this build root (a build host may run its own gitlab-runner).
    [ "$p/root" -ef / ] 2>/dev/null || continue
    case " $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null || :)" in
        *"/gitlab-runner run "* | *" gitlab-runner run "*)
            fail "gitlab-runner is running in the build root (pid ${p#/proc/}): it was started during the bake" ;;
    esac
done
echo "imagectl: gitlab-runner: $found installed by the package's post-install, disabled, not started" >&2
