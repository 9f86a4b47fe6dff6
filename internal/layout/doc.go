// Package layout holds no code: its test checks that the packages import
// each other only in the directions ARCHITECTURE.md draws, so that the
// layout a newcomer reads about is the one the compiler sees. `make lint`
// runs it.
package layout
