package image

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// Linkage is how an ELF executable is linked: the program interpreter
// (PT_INTERP) and the shared libraries it needs (DT_NEEDED). A static
// executable has neither.
type Linkage struct {
	Interp  string
	Needed  []string
	Machine elf.Machine
}

// Static reports that the executable loads no shared library at start.
func (l Linkage) Static() bool { return l.Interp == "" && len(l.Needed) == 0 }

func (l Linkage) String() string {
	if l.Static() {
		return "static"
	}
	return fmt.Sprintf("dynamic (interpreter %s, needs %s)", l.Interp, strings.Join(l.Needed, ", "))
}

// ReadLinkage reads the linkage of the ELF file in b.
func ReadLinkage(b []byte) (Linkage, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return Linkage{}, fmt.Errorf("image: not an ELF file: %w", err)
	}
	defer f.Close()
	l := Linkage{Machine: f.Machine}
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		buf := make([]byte, p.Filesz)
		if _, err := p.ReadAt(buf, 0); err != nil {
			return Linkage{}, fmt.Errorf("image: reading PT_INTERP: %w", err)
		}
		l.Interp = string(bytes.TrimRight(buf, "\x00"))
	}
	l.Needed, err = f.ImportedLibraries()
	if err != nil && !errors.Is(err, elf.ErrNoSymbols) {
		return Linkage{}, fmt.Errorf("image: reading DT_NEEDED: %w", err)
	}
	return l, nil
}

// multiarch is Debian's library directory name per GOARCH.
var multiarch = map[string]string{
	"amd64":   "x86_64-linux-gnu",
	"arm64":   "aarch64-linux-gnu",
	"386":     "i386-linux-gnu",
	"arm":     "arm-linux-gnueabihf",
	"ppc64le": "powerpc64le-linux-gnu",
	"s390x":   "s390x-linux-gnu",
	"riscv64": "riscv64-linux-gnu",
}

// libDirs are where the dynamic loader looks by default, in its order.
func libDirs(goarch string) []string {
	var dirs []string
	if t, ok := multiarch[goarch]; ok {
		dirs = append(dirs, "/lib/"+t, "/usr/lib/"+t)
	}
	return append(dirs, "/lib64", "/usr/lib64", "/lib", "/usr/lib")
}

// SharedLibraries returns, as layer files, what the dynamically linked
// executable bin needs from this machine to start: its program interpreter
// at the path PT_INTERP names, and every DT_NEEDED library (and theirs, to
// the end) where the loader's default search finds it under root ("/" for
// this machine). Files are copied through symlinks. A library that is
// missing or of another machine type is an error: the image would not start.
func SharedLibraries(root string, bin []byte, goarch string) ([]File, error) {
	l, err := ReadLinkage(bin)
	if err != nil {
		return nil, err
	}
	if l.Static() {
		return nil, nil
	}
	if l.Interp == "" {
		return nil, errors.New("image: the executable needs shared libraries but names no interpreter")
	}
	var files []File
	seen := map[string]bool{}
	add := func(p string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(p)))
		if err != nil {
			return nil, err
		}
		if !seen[p] {
			seen[p] = true
			files = append(files, File{Path: p, Mode: 0o755, Data: b})
		}
		return b, nil
	}
	if _, err := add(l.Interp); err != nil {
		return nil, fmt.Errorf("image: the program interpreter: %w", err)
	}
	interpName := path.Base(l.Interp)
	done := map[string]bool{interpName: true} // the loader is loaded already
	queue := append([]string(nil), l.Needed...)
	for len(queue) > 0 {
		name := queue[0]
		queue = queue[1:]
		if done[name] {
			continue
		}
		done[name] = true
		var found bool
		for _, dir := range libDirs(goarch) {
			p := path.Join(dir, name)
			if _, err := os.Stat(filepath.Join(root, filepath.FromSlash(p))); err != nil {
				continue
			}
			b, err := add(p)
			if err != nil {
				return nil, fmt.Errorf("image: %s: %w", p, err)
			}
			dep, err := ReadLinkage(b)
			if err != nil {
				return nil, fmt.Errorf("image: %s: %w", p, err)
			}
			if dep.Machine != l.Machine {
				return nil, fmt.Errorf("image: %s is for %v, the executable for %v", p, dep.Machine, l.Machine)
			}
			queue = append(queue, dep.Needed...)
			found = true
			break
		}
		if !found {
			return nil, fmt.Errorf("image: shared library %s not found in %s under %s: %w", name, strings.Join(libDirs(goarch), " "), root, fs.ErrNotExist)
		}
	}
	return files, nil
}
