//go:build invariants || race

package rollout

// invariants makes Next run Check after every transition (and panic on a
// violation), as pebble does in its invariants and race builds.
const invariants = true
