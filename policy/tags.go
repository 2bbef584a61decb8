package policy

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// CheckTags reports whether a node may carry the requested tags (as with
// `meshd up --advertise-tags`). The requester is the node's user, or the
// tags of the auth key it registered with. A tag is allowed when:
//
//   - the auth key carries it (an admin applied it when creating the key);
//   - one of the auth key's tags owns it in "tagOwners"; or
//   - the user owns it, directly or through a group.
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
		switch {
		case len(keys) > 0:
			errs = append(errs, fmt.Errorf("tag %q is not owned by the auth key's tags %s: add one of them to its \"tagOwners\" or create a key carrying %s", t, strings.Join(keys, ","), t))
		case user != "":
			errs = append(errs, fmt.Errorf("user %s does not own tag %q: add them (or their group) to its \"tagOwners\", or use an auth key carrying the tag", user, t))
		default:
			errs = append(errs, fmt.Errorf("tag %q needs an owner: register with a user's auth key that owns it or a key carrying the tag", t))
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

// Tags returns every tag the policy defines in "tagOwners", sorted.
func (p *Policy) Tags() []string {
	out := make([]string, 0, len(p.tagOwners))
	for t := range p.tagOwners {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}
