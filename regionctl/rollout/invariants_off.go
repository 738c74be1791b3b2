//go:build !invariants && !race

package rollout

const invariants = false
