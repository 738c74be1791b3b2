package raftnode

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
)

// bolt's on-disk meta page (go.etcd.io/bbolt, format version 2): a 16-byte
// page header, then magic, version, page size, flags, root bucket (root
// pgid, sequence), freelist pgid, high-water pgid, txid, checksum.
const (
	boltPageHeader = 16
	boltMetaSize   = 64
	boltMagic      = 0xED0CDAED
)

type boltMeta struct {
	pageSize uint32
	hwm      uint64 // pages in use: the file must hold at least hwm pages
	txid     uint64
}

// checkBoltFile refuses a bolt file that is shorter than its own valid meta
// page says it must be. bbolt would mmap such a file and fault on the first
// page past its end (a signal, not an error), so truncation is caught here.
// A missing or empty file is fine: it is created.
func checkBoltFile(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() == 0 {
		return nil
	}
	m0, err0 := readBoltMeta(f, 0)
	var best *boltMeta
	if err0 == nil {
		best = m0
		if m1, err1 := readBoltMeta(f, int64(m0.pageSize)); err1 == nil && m1.txid > m0.txid {
			best = m1
		}
	}
	if best == nil {
		return fmt.Errorf("no valid bolt meta page (%v)", err0)
	}
	if need := int64(best.hwm) * int64(best.pageSize); fi.Size() < need {
		return fmt.Errorf("truncated: %d bytes, but its meta page says it holds %d pages of %d bytes (%d bytes)", fi.Size(), best.hwm, best.pageSize, need)
	}
	return nil
}

func readBoltMeta(r io.ReaderAt, off int64) (*boltMeta, error) {
	b := make([]byte, boltPageHeader+boltMetaSize)
	if _, err := r.ReadAt(b, off); err != nil {
		return nil, err
	}
	m := b[boltPageHeader:]
	if binary.LittleEndian.Uint32(m[0:]) != boltMagic {
		return nil, errors.New("bad magic")
	}
	h := fnv.New64a()
	h.Write(m[:56])
	if h.Sum64() != binary.LittleEndian.Uint64(m[56:]) {
		return nil, errors.New("bad meta checksum")
	}
	ps := binary.LittleEndian.Uint32(m[8:])
	if ps < 512 || ps > 1<<20 {
		return nil, fmt.Errorf("implausible page size %d", ps)
	}
	return &boltMeta{pageSize: ps, hwm: binary.LittleEndian.Uint64(m[40:]), txid: binary.LittleEndian.Uint64(m[48:])}, nil
}
