//! Docker-style `user[:group]` strings, resolved against the container's own `/etc/passwd`
//! and `/etc/group` the way Docker (moby/sys/user's `GetExecUser`) does.

use super::SecurityError;

/// Largest uid or gid accepted, as Docker.
const MAX_ID: u32 = i32::MAX as u32;

/// Parses a Docker-style `user` (`""`, `"root"`, `"1000"`, `"1000:1000"`, `"nobody"`,
/// `"nobody:nogroup"`) against the text of the container rootfs's `/etc/passwd` and
/// `/etc/group` (empty when the image has none) into (uid, gid, additional gids):
///
/// - the user is matched by name or uid (empty means uid 0); a numeric user with no entry is
///   taken as is, with gid 0; an unknown name is an error;
/// - the primary gid comes from the passwd entry unless a group is given, matched by name or
///   gid; a numeric group with no entry is taken as is; an unknown name is an error;
/// - additional gids are the groups listing the matched user as a member, only when no group
///   is given explicitly.
pub fn resolve_user(
    spec: &str,
    passwd: &str,
    group: &str,
) -> Result<(u32, u32, Vec<u32>), SecurityError> {
    let trimmed = spec.trim();
    let (user_arg, group_arg) = match trimmed.split_once(':') {
        Some((_, g)) if g.contains(':') => {
            return Err(SecurityError::BadUserSpec { spec: spec.into() });
        }
        Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
        None => (trimmed, None),
    };
    let user_arg = if user_arg.is_empty() { "0" } else { user_arg };

    let user_id = parse_id(spec, user_arg)?;
    let entry = passwd_entries(passwd).find(|e| e.name == user_arg || Some(e.uid) == user_id);
    let (uid, mut gid, name) = match (entry, user_id) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name)),
        (None, Some(uid)) => (uid, 0, None),
        (None, None) => {
            return Err(SecurityError::UnknownUser {
                user: user_arg.into(),
            });
        }
    };

    let mut additional = Vec::new();
    if let Some(group_arg) = group_arg {
        let group_id = parse_id(spec, group_arg)?;
        gid = match group_entries(group).find(|g| g.name == group_arg || Some(g.gid) == group_id) {
            Some(g) => g.gid,
            None => group_id.ok_or_else(|| SecurityError::UnknownGroup {
                group: group_arg.into(),
            })?,
        };
    } else if let Some(name) = name {
        for g in group_entries(group) {
            if g.members.split(',').any(|m| m.trim() == name) && !additional.contains(&g.gid) {
                additional.push(g.gid);
            }
        }
    }
    Ok((uid, gid, additional))
}

/// `Some(id)` for an all-digit `arg`, `None` for a name.
fn parse_id(spec: &str, arg: &str) -> Result<Option<u32>, SecurityError> {
    if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match arg.parse::<u32>() {
        Ok(id) if id <= MAX_ID => Ok(Some(id)),
        _ => Err(SecurityError::IdOutOfRange {
            spec: spec.into(),
            id: arg.into(),
        }),
    }
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

/// The well-formed lines of a passwd file (`name:password:uid:gid:gecos:home:shell`);
/// comments and malformed lines are skipped.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    records(text).filter_map(|fields| {
        Some(PasswdEntry {
            name: fields.first()?,
            uid: fields.get(2)?.parse().ok()?,
            gid: fields.get(3)?.parse().ok()?,
        })
    })
}

/// The well-formed lines of a group file (`name:password:gid:member,member`).
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    records(text).filter_map(|fields| {
        Some(GroupEntry {
            name: fields.first()?,
            gid: fields.get(2)?.parse().ok()?,
            members: fields.get(3).copied().unwrap_or(""),
        })
    })
}

fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|fields| fields.first().is_some_and(|name| !name.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken:x:notanumber:1::/:/bin/false
app:x:1000:1000:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
";
    const GROUP: &str = "\
root:x:0:
daemon:x:1:
wheel:x:10:root,app
app:x:1000:
audio:x:29:app, nobody
staff:x:50:app
nogroup:x:65534:
";

    fn resolve(spec: &str) -> (u32, u32, Vec<u32>) {
        resolve_user(spec, PASSWD, GROUP).unwrap_or_else(|e| panic!("{spec:?}: {e}"))
    }

    fn error(spec: &str) -> String {
        match resolve_user(spec, PASSWD, GROUP) {
            Ok(ids) => panic!("{spec:?} resolved to {ids:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_is_root_with_its_groups() {
        assert_eq!(resolve(""), (0, 0, vec![10]));
        assert_eq!(resolve("root"), (0, 0, vec![10]));
        assert_eq!(resolve("0"), (0, 0, vec![10]));
    }

    #[test]
    fn numeric_user_in_passwd_takes_its_gid_and_groups() {
        assert_eq!(resolve("1000"), (1000, 1000, vec![10, 29, 50]));
    }

    #[test]
    fn numeric_user_without_entry_gets_gid_zero() {
        assert_eq!(resolve("4242"), (4242, 0, vec![]));
        assert_eq!(resolve_user("1000", "", "").ok(), Some((1000, 0, vec![])));
        assert_eq!(resolve_user("", "", "").ok(), Some((0, 0, vec![])));
    }

    #[test]
    fn names() {
        assert_eq!(resolve("app"), (1000, 1000, vec![10, 29, 50]));
        assert_eq!(resolve("nobody"), (65534, 65534, vec![29]));
        assert_eq!(resolve("daemon"), (1, 1, vec![]));
    }

    #[test]
    fn explicit_group_replaces_gid_and_drops_additional_groups() {
        assert_eq!(resolve("nobody:nogroup"), (65534, 65534, vec![]));
        assert_eq!(resolve("1000:1000"), (1000, 1000, vec![]));
        assert_eq!(resolve("app:wheel"), (1000, 10, vec![]));
        assert_eq!(resolve("app:10"), (1000, 10, vec![]));
        assert_eq!(resolve("4242:4343"), (4242, 4343, vec![]));
        assert_eq!(resolve(":50"), (0, 50, vec![]));
        assert_eq!(resolve("app:"), (1000, 1000, vec![10, 29, 50]));
    }

    #[test]
    fn unknown_names_are_named_in_the_error() {
        assert_eq!(
            error("ghost"),
            "unable to find user \"ghost\": no matching entry in the container's /etc/passwd"
        );
        assert_eq!(
            error("app:ghosts"),
            "unable to find group \"ghosts\": no matching entry in the container's /etc/group"
        );
        // A malformed line does not match.
        assert!(error("broken").contains("\"broken\""));
        // Without a passwd file, names cannot resolve (as Docker).
        assert!(matches!(
            resolve_user("root", "", ""),
            Err(SecurityError::UnknownUser { user }) if user == "root"
        ));
    }

    #[test]
    fn bad_specs() {
        assert_eq!(
            error("1:2:3"),
            "invalid user \"1:2:3\": expected user[:group]"
        );
        assert_eq!(
            error("4294967296"),
            "id 4294967296 in user \"4294967296\" is out of range (0 to 2147483647)"
        );
        assert!(error("0:2147483648").contains("out of range"));
        assert!(error("-1").contains("unable to find user \"-1\""));
    }

    #[test]
    fn without_group_file() {
        assert_eq!(
            resolve_user("app", PASSWD, "").ok(),
            Some((1000, 1000, vec![]))
        );
    }
}
