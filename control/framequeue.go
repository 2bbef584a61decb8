package control

import "sync"

// frameQueue holds the frames waiting for one map stream's writer, up to
// a bound. It replaces a buffered channel of that bound, which cost every
// stream its full capacity up front (24 KiB of slice headers at 1,024
// frames, scanned by every garbage collection, for 10,000 mostly idle
// streams); this one holds what is queued, and its writer takes all of it
// at once.
type frameQueue struct {
	mu     sync.Mutex
	max    int
	frames [][]byte
	// ready has room for one signal, sent when the queue stops being
	// empty; take empties it, so no frame waits unsignalled.
	ready chan struct{}
}

func newFrameQueue(max int) *frameQueue {
	return &frameQueue{max: max, ready: make(chan struct{}, 1)}
}

// push queues f; false if the queue is full.
func (q *frameQueue) push(f []byte) bool {
	q.mu.Lock()
	if len(q.frames) >= q.max {
		q.mu.Unlock()
		return false
	}
	q.frames = append(q.frames, f)
	first := len(q.frames) == 1
	q.mu.Unlock()
	if first {
		select {
		case q.ready <- struct{}{}:
		default:
		}
	}
	return true
}

// keepCap is the largest backing array a drained queue keeps for reuse: a
// burst's worth is returned to the garbage collector.
const keepCap = 64

// take returns every queued frame, in order, and hands the queue spare
// (emptied) as its next backing array, so that a writer alternating two
// slices allocates nothing in steady state. The caller should clear the
// frames it got before passing that slice back as spare.
func (q *frameQueue) take(spare [][]byte) [][]byte {
	if cap(spare) > keepCap {
		spare = nil
	}
	q.mu.Lock()
	out := q.frames
	q.frames = spare[:0]
	q.mu.Unlock()
	return out
}
