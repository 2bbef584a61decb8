package policy

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// CheckTags reports whether a node may carry the requested tags (as with
// `meshd up --advertise-tags`). The requester is the node's user, or the
// tags of the auth key it registers with (or, when an enrolled node re-tags
// itself, its current tags). A tag is allowed when:
//
//   - the requesting tags include it (an admin applied it when creating the
//     key, or the node already carries it);
//   - one of the requesting tags owns it in "tagOwners"; or
//   - the user owns it, directly or through a group.
//
// An error names each refused tag and the "tagOwners" rule that refused it.
//
// autogroup:admin as an owner grants nothing here: meshd has no admin
// devices, so a tag owned only by autogroup:admin (or with an empty owner
// list) is applied by the admin API (`meshd admin nodes tag`, which does not
// call CheckTags) or by auth keys an admin created with that tag.
// Under the bootstrap default every tag is allowed.
func (p *Policy) CheckTags(user string, keyTags []string, requested []string) error {
	if p.bootstrap {
		return nil
	}
	user = strings.ToLower(user)
	keys := make([]string, len(keyTags))
	for i, t := range keyTags {
		keys[i] = strings.ToLower(t)
	}
	var errs []error
	for _, t := range requested {
		tag := strings.ToLower(t)
		owners, ok := p.tagOwners[tag]
		if !ok {
			errs = append(errs, fmt.Errorf("tag %q is not defined in the policy's \"tagOwners\"", t))
			continue
		}
		if slices.Contains(keys, tag) || p.ownedBy(owners, user, keys) {
			continue
		}
		// Name the rule that decided, so the fix is obvious.
		rule := fmt.Sprintf("\"tagOwners\" at %s gives it to %s", p.tagPos[tag], ownerList(owners))
		switch {
		case len(keys) > 0:
			errs = append(errs, fmt.Errorf("tag %q is not owned by the tags %s (%s): add one of them there, or use an auth key carrying %s", t, strings.Join(keys, ","), rule, t))
		case user != "":
			errs = append(errs, fmt.Errorf("user %s does not own tag %q (%s): add them (or their group) there, or use an auth key carrying the tag", user, t, rule))
		default:
			errs = append(errs, fmt.Errorf("tag %q needs an owner (%s): register with a user's auth key that owns it or a key carrying the tag", t, rule))
		}
	}
	return errors.Join(errs...)
}

func (p *Policy) ownedBy(owners []selector, user string, keyTags []string) bool {
	for _, o := range owners {
		switch o.kind {
		case selUser:
			if user != "" && o.name == user {
				return true
			}
		case selGroup:
			if user != "" && slices.Contains(p.groups[o.name], user) {
				return true
			}
		case selTag:
			if slices.Contains(keyTags, o.name) {
				return true
			}
		}
	}
	return false
}

// OwnedByTags reports whether every one of tags is owned in "tagOwners" by
// one of owners (tags too), as a tenant's enrolment tag owns the tags of its
// machines. Carrying a tag is not owning it: a tag owns itself only if its
// own "tagOwners" entry says so. With no tags, or under the bootstrap
// default (which has no "tagOwners"), it reports false. The coordinator
// uses it to let such tags replace, rather than join, an auth key's tags.
func (p *Policy) OwnedByTags(owners, tags []string) bool {
	if p.bootstrap || len(tags) == 0 || len(owners) == 0 {
		return false
	}
	lowered := make([]string, len(owners))
	for i, o := range owners {
		lowered[i] = strings.ToLower(o)
	}
	for _, t := range tags {
		sels, ok := p.tagOwners[strings.ToLower(t)]
		if !ok || !slices.ContainsFunc(sels, func(s selector) bool { return s.kind == selTag && slices.Contains(lowered, s.name) }) {
			return false
		}
	}
	return true
}

func ownerList(owners []selector) string {
	if len(owners) == 0 {
		return "nobody (only admin-created keys and `meshd admin nodes tag` apply it)"
	}
	raw := make([]string, len(owners))
	for i, o := range owners {
		raw[i] = o.raw
	}
	return "[" + strings.Join(raw, ", ") + "]"
}

// Tags returns every tag the policy defines in "tagOwners", sorted.
func (p *Policy) Tags() []string {
	out := make([]string, 0, len(p.tagOwners))
	for t := range p.tagOwners {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}
