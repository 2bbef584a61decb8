package control

import (
	"fmt"
	"sync"
	"testing"
)

func TestFrameQueue(t *testing.T) {
	q := newFrameQueue(3)
	select {
	case <-q.ready:
		t.Fatal("an empty queue signalled")
	default:
	}
	for i := range 3 {
		if !q.push([]byte{byte(i)}) {
			t.Fatalf("push %d refused below the bound", i)
		}
	}
	if q.push([]byte{9}) {
		t.Fatal("push past the bound accepted")
	}
	select {
	case <-q.ready:
	default:
		t.Fatal("a queue with frames did not signal")
	}
	got := q.take(nil)
	if len(got) != 3 || got[0][0] != 0 || got[2][0] != 2 {
		t.Fatalf("take = %v, want the three frames in order", got)
	}
	if again := q.take(nil); len(again) != 0 {
		t.Fatalf("second take = %v, want nothing", again)
	}
	// The spare handed back is reused: pushing then taking hands out the
	// array the writer gave, with no allocation.
	clear(got)
	q.take(got)
	frame := []byte{7}
	q.push(frame)
	if allocs := testing.AllocsPerRun(100, func() {
		b := q.take(got)
		clear(b)
		got = b
		q.push(frame)
	}); allocs != 0 {
		t.Fatalf("%.1f allocations per take and push in steady state, want 0", allocs)
	}
}

// TestFrameQueueNoLostSignal: a writer that waits for the signal, then
// takes everything, sees every frame a concurrent producer pushed, in
// order (run with -race).
func TestFrameQueueNoLostSignal(t *testing.T) {
	const n = 20000
	q := newFrameQueue(n)
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range n {
			q.push([]byte(fmt.Sprint(i)))
		}
	})
	next := 0
	var batch [][]byte
	for next < n {
		<-q.ready
		batch = q.take(batch)
		for _, f := range batch {
			if string(f) != fmt.Sprint(next) {
				t.Fatalf("frame %q, want %d", f, next)
			}
			next++
		}
		clear(batch)
	}
	wg.Wait()
}
