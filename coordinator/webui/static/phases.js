// The session phases the console knows, in the order it lists them.

export const PHASES = ['running', 'paused', 'completed', 'failed', 'cancelled'];
export const FINISHED = new Set(['completed', 'failed', 'cancelled']);
