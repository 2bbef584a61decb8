package control

import "slices"

// registrationTags returns the tags of a node registering with an auth key
// carrying keyTags and advertising requested (both normalized, and
// requested already allowed by CheckTags). When the key's tags own every
// requested tag in "tagOwners", the requested tags replace the key's: the
// key is an enrolment identity (a tenant's provisioning tag) and the node
// becomes what it asked to be. Otherwise the key's tags are carried and the
// requested ones join them.
func registrationTags(pol Policy, keyTags, requested []string) []string {
	if o, ok := pol.(TagOwnership); ok && len(keyTags) > 0 && o.OwnedByTags(keyTags, requested) {
		return slices.Clone(requested)
	}
	return slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(keyTags), requested...))))
}
