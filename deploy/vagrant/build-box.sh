#!/usr/bin/env bash
# Builds a Debian 12 Vagrant box for the libvirt provider (a VM) or the lxc provider (a
# system container) offline, from this machine's configured Debian source (no box is
# downloaded):
#
#   deploy/vagrant/build-box.sh [--provider libvirt|lxc] [OUTPUT.box]
#     [default: /var/cache/skiff-test/debian-12-skiff.box, or debian-12-skiff-lxc.box]
#
# lxc: the same root file system without kernel and boot loader, packed as vagrant-lxc reads
# it (rootfs.tar.gz, metadata.json, and lxc-config: a privileged container that may run
# containers itself: no AppArmor confinement, every capability and device, cgroups and /sys
# writable, /dev/net/tun for the userspace WireGuard backend). Its network is set by the
# Vagrantfile (LXC puts the address on the link before init), so no DHCP runs in it.
#
# debootstrap (minbase with systemd, udev, openssh-server, sudo, the cloud kernel, grub) into a
# 3 GiB raw disk, then qemu-img convert -c to qcow2, packed with the metadata vagrant-libvirt
# reads. About 1.5 minutes and 200 MB. The image is what a Debian 12 host is for Skiff: pure
# cgroup v2, the kernel's WireGuard module, iptables. Its user vagrant has Vagrant's insecure
# public key (from Debian's vagrant package; Vagrant replaces it on first boot) and
# passwordless sudo. The machine id and the ssh host keys are made at each VM's first boot, so
# VMs of one box differ. Networks come up with DHCP (systemd-networkd) on every en* link.
#
# Needs root, debootstrap, qemu-img, parted, losetup and partx (util-linux).
set -euo pipefail
provider=libvirt
if [ "${1:-}" = --provider ]; then provider=${2:?--provider libvirt|lxc}; shift 2; fi
case $provider in
  libvirt) out=${1:-/var/cache/skiff-test/debian-12-skiff.box}; tools="debootstrap qemu-img parted losetup partx mkfs.ext4" ;;
  lxc) out=${1:-/var/cache/skiff-test/debian-12-skiff-lxc.box}; tools="debootstrap" ;;
  *) echo "build-box: --provider libvirt or lxc" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "build-box: needs root" >&2; exit 1; }
for t in $tools; do
  command -v "$t" >/dev/null || { echo "build-box: $t is missing" >&2; exit 1; }
done
key=$(dpkg -L vagrant 2>/dev/null | grep '/keys/vagrant\.pub$' | head -1 || true)
[ -f "$key" ] || { echo "build-box: Vagrant's insecure public key is missing (Debian's vagrant package)" >&2; exit 1; }
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { echo "build-box: no Debian source configured in /etc/apt" >&2; exit 1; }

work=$(mktemp -d /tmp/sk$$-box.XXXX)
mnt=$work/mnt
loop=""
cleanup() {
  local rc=$?
  for m in dev/pts dev proc sys ""; do
    mountpoint -q "$mnt/$m" 2>/dev/null && umount -l "$mnt/$m"
  done
  if [ -n "$loop" ]; then
    partx -d "$loop" 2>/dev/null || true
    losetup -d "$loop" 2>/dev/null || true
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

include=systemd-sysv,udev,dbus,openssh-server,sudo,iproute2,iptables,procps,kmod,ca-certificates
[ "$provider" = libvirt ] && include=$include,linux-image-cloud-amd64,grub-pc,e2fsprogs
echo "build-box: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include="$include" \
  bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log" >&2; exit 1; }

# What both boxes get: a machine id and ssh host keys made at first boot, the vagrant user
# with Vagrant's insecure key and passwordless sudo.
configure_common() {
  local r=$1
  echo skiff-box >"$r/etc/hostname"
  : >"$r/etc/machine-id"
  rm -f "$r"/etc/ssh/ssh_host_*
  cat >"$r/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Make this machine's ssh host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
EOF
  # systemd-networkd runs in both (Vagrant restarts it after setting the hostname); in the
  # lxc box no .network file matches, so it leaves the address LXC set alone.
  chroot "$r" systemctl enable systemd-networkd ssh-host-keys.service ssh >/dev/null 2>&1
  chroot "$r" useradd -m -s /bin/bash vagrant
  echo "vagrant ALL=(ALL) NOPASSWD: ALL" >"$r/etc/sudoers.d/vagrant"
  chmod 0440 "$r/etc/sudoers.d/vagrant"
  install -d -m 0700 -o 1000 -g 1000 "$r/home/vagrant/.ssh"
  install -m 0600 -o 1000 -g 1000 "$key" "$r/home/vagrant/.ssh/authorized_keys"
  echo 'UseDNS no' >"$r/etc/ssh/sshd_config.d/vagrant.conf"
}

if [ "$provider" = lxc ]; then
  echo "build-box: configure (lxc)"
  configure_common "$work/root"
  : >"$work/root/etc/fstab"
  chroot "$work/root" apt-get clean
  echo "build-box: rootfs.tar.gz and box"
  mkdir -p "$work/box"
  # vagrant-lxc unpacks it with --strip-components=2: ./rootfs/bin -> bin.
  mv "$work/root" "$work/rootfs"
  tar -C "$work" --numeric-owner --xattrs -czf "$work/box/rootfs.tar.gz" ./rootfs
  cat >"$work/box/metadata.json" <<EOF
{"provider": "lxc", "version": "1.0.0", "built-on": "$(date -u +%Y-%m-%d)"}
EOF
  cat >"$work/box/lxc-config" <<'EOF'
lxc.apparmor.profile = unconfined
lxc.cap.drop =
lxc.mount.auto = proc:rw sys:rw cgroup:rw
lxc.cgroup.devices.allow = a
lxc.autodev = 1
lxc.pty.max = 10
lxc.tty.max = 1
lxc.environment = container=lxc
lxc.mount.entry = /dev/net/tun dev/net/tun none bind,create=file 0 0
EOF
  mkdir -p "$(dirname "$out")"
  tar -C "$work/box" -czf "$out.tmp" metadata.json rootfs.tar.gz lxc-config
  mv -f "$out.tmp" "$out"
  echo "build-box: $out ($(du -h "$out" | cut -f1))"
  exit 0
fi

echo "build-box: disk"
truncate -s 3G "$work/disk.raw"
parted -s "$work/disk.raw" mklabel msdos mkpart primary ext4 1MiB 100% set 1 boot on
loop=$(losetup -f --show -P "$work/disk.raw")
partx -a "$loop" 2>/dev/null || true # no udev here: make the partition node ourselves
[ -b "${loop}p1" ] || { echo "build-box: no partition device ${loop}p1" >&2; exit 1; }
mkfs.ext4 -q -L skiff-root "${loop}p1"
mkdir -p "$mnt"
mount "${loop}p1" "$mnt"
cp -a "$work/root/." "$mnt/"
for m in dev dev/pts proc sys; do mount --bind "/$m" "$mnt/$m"; done

echo "build-box: configure"
cat >"$mnt/etc/fstab" <<'EOF'
LABEL=skiff-root / ext4 errors=remount-ro 0 1
EOF
configure_common "$mnt"
# After Vagrant's own (50-vagrant-*.network), which configure the private network.
cat >"$mnt/etc/systemd/network/99-dhcp.network" <<'EOF'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
LinkLocalAddressing=no
EOF
# Boot on the serial console, root by label, no menu delay.
cat >"$mnt/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200 root=LABEL=skiff-root net.ifnames=1"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_LINUX_UUID=true
GRUB_DISABLE_OS_PROBER=true
EOF
chroot "$mnt" grub-install --target=i386-pc "$loop" >/dev/null 2>&1
chroot "$mnt" update-grub >/dev/null 2>&1
# update-grub writes the loop device as root=: point every entry at the label.
sed -i "s|root=/dev/loop[0-9p]*|root=LABEL=skiff-root|g" "$mnt/boot/grub/grub.cfg"
chroot "$mnt" apt-get clean
for m in dev/pts dev proc sys; do umount "$mnt/$m"; done
umount "$mnt"
partx -d "$loop" 2>/dev/null || true
losetup -d "$loop"
loop=""

echo "build-box: qcow2 and box"
qemu-img convert -c -O qcow2 "$work/disk.raw" "$work/box.img"
cat >"$work/metadata.json" <<'EOF'
{"provider": "libvirt", "format": "qcow2", "virtual_size": 3}
EOF
mkdir -p "$(dirname "$out")"
tar -C "$work" -czf "$out.tmp" metadata.json box.img
mv -f "$out.tmp" "$out"
echo "build-box: $out ($(du -h "$out" | cut -f1))"
