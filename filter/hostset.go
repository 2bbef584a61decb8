package filter

import "math/bits"

// hostSet4 and hostSet6 are immutable open-addressing hash sets of single
// addresses, each mapped to a rule index. They are built once per compiled
// source set; the load factor is at most 1/2, so a lookup is one
// multiplication and, almost always, one or two probes. The keys come from
// the policy, not from packets, so no adversary can shape the probe chains.
type hostSet4 struct {
	slots []hostRule4 // rule -1: empty
	shift uint
}

type hostRule4 struct {
	key  uint32
	rule int32
}

type hostSet6 struct {
	slots []hostRule6
	shift uint
}

type hostRule6 struct {
	hi, lo uint64
	rule   int32
}

func tableBits(n int) uint {
	b := uint(bits.Len(uint(2*n - 1)))
	if b < 1 {
		b = 1
	}
	return b
}

func newHostSet4(hosts []hostRule4) hostSet4 {
	if len(hosts) == 0 {
		return hostSet4{}
	}
	b := tableBits(len(hosts))
	h := hostSet4{slots: make([]hostRule4, 1<<b), shift: 64 - b}
	for i := range h.slots {
		h.slots[i].rule = -1
	}
	mask := len(h.slots) - 1
	for _, e := range hosts {
		for i := h.home(e.key); ; i = (i + 1) & mask {
			if h.slots[i].rule < 0 {
				h.slots[i] = e
				break
			}
		}
	}
	return h
}

func (h *hostSet4) home(k uint32) int {
	return int((uint64(k) * 0x9e3779b97f4a7c15) >> h.shift)
}

// get returns the rule of address a, or -1.
func (h *hostSet4) get(k uint32) int32 {
	if len(h.slots) == 0 {
		return -1
	}
	mask := len(h.slots) - 1
	for i := h.home(k); ; i = (i + 1) & mask {
		s := &h.slots[i]
		if s.rule < 0 {
			return -1
		}
		if s.key == k {
			return s.rule
		}
	}
}

func newHostSet6(hosts []hostRule6) hostSet6 {
	if len(hosts) == 0 {
		return hostSet6{}
	}
	b := tableBits(len(hosts))
	h := hostSet6{slots: make([]hostRule6, 1<<b), shift: 64 - b}
	for i := range h.slots {
		h.slots[i].rule = -1
	}
	mask := len(h.slots) - 1
	for _, e := range hosts {
		for i := h.home(e.hi, e.lo); ; i = (i + 1) & mask {
			if h.slots[i].rule < 0 {
				h.slots[i] = e
				break
			}
		}
	}
	return h
}

func (h *hostSet6) home(hi, lo uint64) int {
	return int(((hi ^ bits.RotateLeft64(lo, 29)) * 0x9e3779b97f4a7c15) >> h.shift)
}

func (h *hostSet6) get(hi, lo uint64) int32 {
	if len(h.slots) == 0 {
		return -1
	}
	mask := len(h.slots) - 1
	for i := h.home(hi, lo); ; i = (i + 1) & mask {
		s := &h.slots[i]
		if s.rule < 0 {
			return -1
		}
		if s.hi == hi && s.lo == lo {
			return s.rule
		}
	}
}
