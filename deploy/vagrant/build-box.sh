#!/usr/bin/env bash
# Builds a Debian 12 Vagrant box for the libvirt provider offline, from this machine's
# configured Debian source (no box is downloaded):
#
#   deploy/vagrant/build-box.sh [OUTPUT.box]     [default: /var/cache/skiff-test/debian-12-skiff.box]
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
out=${1:-/var/cache/skiff-test/debian-12-skiff.box}
[ "$(id -u)" = 0 ] || { echo "build-box: needs root" >&2; exit 1; }
for t in debootstrap qemu-img parted losetup partx mkfs.ext4; do
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

echo "build-box: debootstrap bookworm from $mirror"
debootstrap --variant=minbase \
  --include=systemd-sysv,udev,dbus,openssh-server,sudo,iproute2,iptables,procps,kmod,ca-certificates,linux-image-cloud-amd64,grub-pc,e2fsprogs \
  bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log" >&2; exit 1; }

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
echo skiff-box >"$mnt/etc/hostname"
# Made at first boot, one per VM.
: >"$mnt/etc/machine-id"
rm -f "$mnt"/etc/ssh/ssh_host_*
cat >"$mnt/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Make this VM's ssh host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
[Install]
WantedBy=multi-user.target
EOF
# After Vagrant's own (50-vagrant-*.network), which configure the private network.
cat >"$mnt/etc/systemd/network/99-dhcp.network" <<'EOF'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
LinkLocalAddressing=no
EOF
chroot "$mnt" systemctl enable systemd-networkd ssh-host-keys.service ssh >/dev/null 2>&1
chroot "$mnt" useradd -m -s /bin/bash vagrant
echo "vagrant ALL=(ALL) NOPASSWD: ALL" >"$mnt/etc/sudoers.d/vagrant"
chmod 0440 "$mnt/etc/sudoers.d/vagrant"
install -d -m 0700 -o 1000 -g 1000 "$mnt/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$key" "$mnt/home/vagrant/.ssh/authorized_keys"
echo 'UseDNS no' >"$mnt/etc/ssh/sshd_config.d/vagrant.conf"
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
