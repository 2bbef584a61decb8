package sshserver

import (
	"encoding/binary"
	"errors"

	"golang.org/x/sys/unix"
)

// termMode is one encoded terminal mode of a pty-req (RFC 4254 8).
type termMode struct {
	op  byte
	arg uint32
}

// parseModes decodes a pty-req's encoded terminal modes: opcode and
// uint32 pairs up to TTY_OP_END (0). Opcodes 160 and up have undefined
// arguments, so decoding stops there, as OpenSSH does.
func parseModes(b []byte) ([]termMode, error) {
	var out []termMode
	for len(b) > 0 {
		op := b[0]
		if op == 0 || op >= 160 {
			return out, nil
		}
		if len(b) < 5 {
			return nil, errors.New("truncated terminal mode")
		}
		out = append(out, termMode{op, binary.BigEndian.Uint32(b[1:5])})
		b = b[5:]
	}
	return out, nil
}

// Opcodes of RFC 4254 8: control characters and flags.
var (
	modeChars = map[byte]int{
		1: unix.VINTR, 2: unix.VQUIT, 3: unix.VERASE, 4: unix.VKILL, 5: unix.VEOF, 6: unix.VEOL, 7: unix.VEOL2,
		8: unix.VSTART, 9: unix.VSTOP, 10: unix.VSUSP, 12: unix.VREPRINT, 13: unix.VWERASE, 14: unix.VLNEXT,
		18: unix.VDISCARD,
	}
	modeIflag = map[byte]uint32{
		30: unix.IGNPAR, 31: unix.PARMRK, 32: unix.INPCK, 33: unix.ISTRIP, 34: unix.INLCR, 35: unix.IGNCR,
		36: unix.ICRNL, 37: unix.IUCLC, 38: unix.IXON, 39: unix.IXANY, 40: unix.IXOFF, 41: unix.IMAXBEL, 42: unix.IUTF8,
	}
	modeLflag = map[byte]uint32{
		50: unix.ISIG, 51: unix.ICANON, 52: unix.XCASE, 53: unix.ECHO, 54: unix.ECHOE, 55: unix.ECHOK, 56: unix.ECHONL,
		57: unix.NOFLSH, 58: unix.TOSTOP, 59: unix.IEXTEN, 60: unix.ECHOCTL, 61: unix.ECHOKE, 62: unix.PENDIN,
	}
	modeOflag = map[byte]uint32{70: unix.OPOST, 71: unix.OLCUC, 72: unix.ONLCR, 73: unix.OCRNL, 74: unix.ONOCR, 75: unix.ONLRET}
	modeCflag = map[byte]uint32{90: unix.CS7, 91: unix.CS8, 92: unix.PARENB, 93: unix.PARODD}
)

// applyModes sets the client's terminal modes on t; unknown opcodes
// (speeds, which a pseudo-terminal ignores) are skipped.
func applyModes(t *unix.Termios, modes []termMode) {
	set := func(flags *uint32, bit uint32, on bool) {
		if on {
			*flags |= bit
		} else {
			*flags &^= bit
		}
	}
	for _, m := range modes {
		on := m.arg != 0
		if i, ok := modeChars[m.op]; ok {
			t.Cc[i] = uint8(m.arg)
		} else if b, ok := modeIflag[m.op]; ok {
			set(&t.Iflag, b, on)
		} else if b, ok := modeLflag[m.op]; ok {
			set(&t.Lflag, b, on)
		} else if b, ok := modeOflag[m.op]; ok {
			set(&t.Oflag, b, on)
		} else if b, ok := modeCflag[m.op]; ok {
			set(&t.Cflag, b, on)
		}
	}
}
